"""Map the tensor names of a saved PEFT LoRA adapter to the modules they adapt.

``PeftModel.save_pretrained`` (checked empirically with peft 0.21 / transformers 5)
strips the adapter name and writes, for a module ``M`` such as
``base_model.model.model.layers.0.self_attn.q_proj``:

* ``M.lora_A.weight`` / ``M.lora_B.weight``: linear LoRA, A ``(r, in)``, B ``(out, r)``;
* ``M.lora_embedding_A`` / ``M.lora_embedding_B``: embedding LoRA, A
  ``(r, num_embeddings)``, B ``(embedding_dim, r)``;
* ``M.lora_magnitude_vector``: DoRA magnitude ``(out,)`` (older peft wrote
  ``M.lora_magnitude_vector.weight``; both are accepted);
* ``M.lora_B.bias``: ``lora_bias=True``, ``(out,)``.

Other tensors are *extras* the adapter also carries: ``modules_to_save`` copies are
saved under the module's own path (``base_model.model.lm_head.weight``, not
``...modules_to_save.default.weight``), and targeting an embedding also saves
``M.base_layer.weight``. An unsaved-form key that still names an adapter
(``lora_A.default.weight``) or any other ``lora_*`` spelling is refused: peft
would not load it, silently.

The base model's weight for ``M`` is ``M`` without the ``base_model.model.`` prefix
plus ``.weight`` (:func:`base_weight_key`); extras map the same way, dropping a
``.base_layer`` / ``.modules_to_save.<name>`` / ``.original_module`` segment
(:func:`base_key_for_extra`).

``rank_pattern`` / ``alpha_pattern`` keys are matched as peft does
(:func:`rank_for`), in linear time by :mod:`registry.formats.patterns` (RE2), which also refuses
at ingest every config pattern RE2 cannot run (:func:`validate_lora_config`). :func:`validate_lora_config` checks the fields of an
``adapter_config.json`` that adapterkit relies on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from registry.errors import BadInputError, UnsupportedAdapterError
from registry.formats.fields import is_finite_number, is_int, is_string_list
from registry.formats.patterns import check_config_patterns, pattern_key

PEFT_PREFIX = "base_model.model."
BIAS_VALUES = ("none", "all", "lora_only")

_LORA_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_A\.weight\Z"), "a"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.weight\Z"), "b"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.bias\Z"), "bias"),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_A\Z"), "ea"),
    (re.compile(r"^(?P<m>.+)\.lora_embedding_B\Z"), "eb"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.weight)?\Z"), "magnitude"),
)
_LORA_MARK = re.compile(r"(^|\.)lora_[A-Za-z_]*")
_WRAPPER_SEGMENT = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


@dataclass(frozen=True)
class LoraKeys:
    """Tensor names of one adapted module.

    Attributes:
        a: Key of the down projection (``lora_A.weight`` or ``lora_embedding_A``).
        b: Key of the up projection (``lora_B.weight`` or ``lora_embedding_B``).
        magnitude: Key of the DoRA magnitude vector, if any.
        bias: Key of ``lora_B.bias`` (``lora_bias=True``), if any.
        embedding: True for embedding LoRA, whose A is ``(r, num_embeddings)`` and B
            is ``(embedding_dim, r)``; the delta to the base ``(num_embeddings,
            embedding_dim)`` weight is ``(B @ A).T``.
    """

    a: str
    b: str
    magnitude: str | None = None
    bias: str | None = None
    embedding: bool = False


def _bad_key(name: str, problem: str) -> BadInputError:
    return BadInputError(
        f"adapter tensor {name[:200]!r}: {problem}",
        fix="save the adapter with PeftModel.save_pretrained (keys without the adapter name)",
    )


def split_keys(tensor_names: Iterable[str]) -> tuple[dict[str, LoraKeys], list[str]]:
    """Group LoRA tensors by module and list the remaining (extra) tensors.

    Args:
        tensor_names: Names in an ``adapter_model.safetensors``.

    Returns:
        ``(modules, extras)``: module path -> :class:`LoraKeys`, sorted by path, and the
        sorted names that are not LoRA tensors (``modules_to_save`` copies,
        ``base_layer`` weights of adapted embeddings, ...).

    Raises:
        BadInputError: a ``lora_*`` key has an unknown form, a module mixes linear and
            embedding keys, or lacks its A or B.
    """
    parts: dict[str, dict[str, str]] = {}
    extras: list[str] = []
    for name in tensor_names:
        for pattern, role in _LORA_PATTERNS:
            match = pattern.match(name)
            if match:
                module = match.group("m")
                slot = parts.setdefault(module, {})
                if role in slot:
                    raise _bad_key(name, f"duplicates {slot[role]!r}")
                slot[role] = name
                break
        else:
            if _LORA_MARK.search(name):
                raise _bad_key(name, "unrecognized LoRA key form")
            extras.append(name)
    modules: dict[str, LoraKeys] = {}
    for module in sorted(parts):
        slot = parts[module]
        linear = "a" in slot or "b" in slot or "bias" in slot
        embedding = "ea" in slot or "eb" in slot
        if linear and embedding:
            raise _bad_key(module, "mixes lora_A/lora_B with lora_embedding_A/B")
        a_role, b_role = ("ea", "eb") if embedding else ("a", "b")
        for role, label in ((a_role, "A"), (b_role, "B")):
            if role not in slot:
                raise _bad_key(module, f"LoRA {label} tensor missing")
        modules[module] = LoraKeys(
            a=slot[a_role],
            b=slot[b_role],
            magnitude=slot.get("magnitude"),
            bias=slot.get("bias"),
            embedding=embedding,
        )
    return modules, sorted(extras)




def strip_prefix(name: str) -> str:
    """``base_model.model.X`` -> ``X`` (names without the prefix are returned as is)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def base_weight_key(module_path: str) -> str:
    """The base model's weight for a LoRA module path.

    ``"base_model.model.model.layers.0.self_attn.q_proj"`` ->
    ``"model.layers.0.self_attn.q_proj.weight"``.
    """
    return strip_prefix(module_path) + ".weight"


def base_key_for_extra(name: str) -> str:
    """The base tensor an extra adapter tensor replaces.

    ``"base_model.model.lm_head.weight"`` -> ``"lm_head.weight"``;
    ``"base_model.model.model.embed_tokens.base_layer.weight"`` ->
    ``"model.embed_tokens.weight"``.
    """
    return _WRAPPER_SEGMENT.sub("", strip_prefix(name))


def rank_for(module_path: str, r: int, rank_pattern: dict[str, int] | None) -> int:
    """The rank peft gives a module: the first ``rank_pattern`` key matching it, else ``r``.

    Matching follows ``peft.utils.other.get_pattern_key``: key ``K`` matches module name
    ``N`` (without ``base_model.model.``) when ``re.match(rf"(.*\\.)?({K})$", N)``; it is
    evaluated in linear time by :mod:`registry.formats.patterns`.

    Raises:
        BadInputError: a pattern is invalid or cannot be matched in linear time.
    """
    return _pattern_value(module_path, r, rank_pattern, "rank_pattern")


def alpha_for(module_path: str, alpha: float, alpha_pattern: dict[str, float] | None) -> float:
    """The lora_alpha peft gives a module (``alpha_pattern`` matched like :func:`rank_for`).

    Raises:
        BadInputError: a pattern is invalid or cannot be matched in linear time.
    """
    return _pattern_value(module_path, alpha, alpha_pattern, "alpha_pattern")


_Value = TypeVar("_Value", int, float)


def _pattern_value(module_path: str, default: _Value, patterns: dict[str, _Value] | None,
                   field: str) -> _Value:
    if not patterns:
        return default
    name = strip_prefix(module_path)
    key = pattern_key(patterns, name, field)
    return patterns.get(name if key is None else key, default)  # as peft: .get(r_key, r)


def _cfg_error(path: Path, field: str, problem: str) -> BadInputError:
    return BadInputError(
        f"{path}: {field} {problem}",
        fix=f"fix {field} in adapter_config.json (see PEFT's LoraConfig)",
    )








def validate_lora_config(config: Any, path: Path) -> dict[str, Any]:
    """Check the fields of a parsed ``adapter_config.json`` that adapterkit relies on.

    Args:
        config: The parsed JSON.
        path: The file, for messages.

    Returns:
        ``config`` itself (unknown PEFT fields are kept untouched).

    Raises:
        UnsupportedAdapterError: ``peft_type`` is not ``"LORA"``.
        BadInputError: a field is missing or has the wrong type, or a pattern PEFT would
            match cannot be matched in linear time (message names it).
    """
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: not a JSON object", fix="fix adapter_config.json")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise _cfg_error(path, "peft_type", "must be a string such as \"LORA\"")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{path}: peft_type {peft_type[:40]!r} is not supported (LoRA adapters only)",
            fix="use a LoRA adapter (peft LoraConfig)",
        )
    if not is_int(config.get("r")) or config["r"] < 1:
        raise _cfg_error(path, "r", "must be a positive integer")
    if not is_finite_number(config.get("lora_alpha")):
        raise _cfg_error(path, "lora_alpha", "must be a finite number")
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) and targets) and not is_string_list(
        targets
    ):
        raise _cfg_error(path, "target_modules", "must be a string or a list of strings")
    for field, check, what in (
        ("rank_pattern", lambda v: is_int(v) and v >= 1, "positive integers"),
        ("alpha_pattern", is_finite_number, "finite numbers"),
    ):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(check(v) for v in patterns.values()):
            raise _cfg_error(path, field, f"must be an object of {what}")
        for key in patterns:
            if not key:
                raise _cfg_error(path, field, "has an empty key")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode"):
        if field in config and not isinstance(config[field], bool):
            raise _cfg_error(path, field, "must be true or false")
    saved = config.get("modules_to_save")
    if saved is not None and not is_string_list(saved):
        raise _cfg_error(path, "modules_to_save", "must be a list of strings or null")
    for field in ("exclude_modules", "layers_pattern"):
        value = config.get(field)
        if value is not None and not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise _cfg_error(path, field, "must be a string, a list of strings or null")
    if "bias" in config and config["bias"] not in BIAS_VALUES:
        raise _cfg_error(path, "bias", f"must be one of {', '.join(BIAS_VALUES)}")
    dropout = config.get("lora_dropout", 0.0)
    if not is_finite_number(dropout) or not 0 <= dropout <= 1:
        raise _cfg_error(path, "lora_dropout", "must be a number in [0, 1]")
    for field in ("task_type", "base_model_name_or_path", "revision"):
        value = config.get(field)
        if value is not None and not isinstance(value, str):
            raise _cfg_error(path, field, "must be a string or null")
    if config.get("task_type") == "":
        raise _cfg_error(path, "task_type", "must be a non-empty string or null")
    check_config_patterns(config)
    return config
