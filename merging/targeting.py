"""Which LoRA tensors of an adapter file PEFT loads: only those may be merged or unloaded.

PEFT builds a LoRA layer for each module its config selects (``target_modules``, narrowed
by ``exclude_modules``, ``layers_to_transform``/``layers_pattern`` and
``modules_to_save``; plus ``lm_head`` when ``ensure_weight_tying`` ties it to an adapted
embedding), then loads the file's tensors into those layers: tensors of any other module,
and keys without PEFT's ``base_model.model.`` prefix, are silently ignored. The gate
scores what PEFT loads, while merge, unload and merge-search used to apply every
``lora_A``/``lora_B`` pair in the file, so a passing gate could ship a different model
(measured: retention 1.0 at the gate, 0.0 after ``unload``). :func:`check_targeted`
refuses such a file instead (``UnsupportedAdapterError``, exit 2), using the same
targeting rules as the gate (:func:`registry.formats.patterns.module_targeted`).

``target_modules: null`` is resolved by PEFT from the model type, which is not known
here: such configs are not checked. ``"all-linear"`` (any case) selects every ``Linear``
and ``Conv1D`` module but the model's output layer: an embedding's LoRA is refused
here, the other rules still apply, and the output layer, which only the base can name,
is refused by :func:`check_output_layer` where the base is known (``unload``,
merge-search). PEFT writes the resolved list when it saves an adapter, so such configs
are hand-made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from merging.tied import ModuleShape, tied_pair
from registry.errors import UnsupportedAdapterError, shorten
from registry.formats.patterns import is_all_linear, module_targeted
from registry.formats.peft_keys import PEFT_PREFIX, strip_prefix


def check_targeted(root: Path, config: Mapping[str, Any], infos: Mapping[str, ModuleShape]) -> None:
    """Refuse LoRA modules in the file that PEFT would not load (module docstring).

    Raises:
        UnsupportedAdapterError: A module key without PEFT's prefix, or one the config
            does not select.
        BadInputError: A config pattern that cannot be matched in linear time.
    """
    targets = config.get("target_modules")
    if targets is None:
        return
    all_linear = is_all_linear(targets)
    pair = tied_pair(config, infos)
    for name in infos:
        if not name.startswith(PEFT_PREFIX):
            raise UnsupportedAdapterError(
                f"LoRA tensors of {shorten(name)} lack PEFT's {PEFT_PREFIX!r} prefix, so PEFT "
                f"(and the gate) would not load them ({root})",
                fix="re-save the adapter with PeftModel.save_pretrained")
        if pair is not None and name == pair.head:
            continue  # ensure_weight_tying adds lm_head to the embedding's LoRA
        bare = strip_prefix(name)
        if all_linear and infos[name].embedding:
            raise UnsupportedAdapterError(
                f"LoRA tensors for the embedding {shorten(bare)}, which all-linear does not "
                f"select (Linear layers only): PEFT, and so the gate, would ignore them ({root})",
                fix="list the modules in target_modules, or remove the embedding's tensors")
        selected = {**config, "target_modules": [bare]} if all_linear else config
        if not module_targeted(selected, bare):
            raise UnsupportedAdapterError(
                f"LoRA tensors for {shorten(bare)}, which the config does not "
                "select: PEFT, and so the gate, would ignore them (target_modules, "
                f"exclude_modules, layers_to_transform, modules_to_save; {root})",
                fix="add the module to target_modules if it was trained, or remove its tensors")


def check_output_layer(root: Path, config: Mapping[str, Any], infos: Mapping[str, Any],
                       output_layer: str | None) -> None:
    """Refuse an ``all-linear`` adapter's LoRA on the base's output layer (PEFT leaves it out).

    Args:
        root: The adapter directory (for the message).
        config: Its ``adapter_config.json``.
        infos: Its modules, by PEFT name (``base_model.model.lm_head``).
        output_layer: The base's output layer module (``lm_head``), or None if unknown.

    Raises:
        UnsupportedAdapterError: The config says ``all-linear`` and the file adapts the
            output layer: PEFT, and so the gate, would ignore those tensors.
    """
    if output_layer is None or not is_all_linear(config.get("target_modules")):
        return
    if any(strip_prefix(name) == output_layer for name in infos):
        raise UnsupportedAdapterError(
            f"LoRA tensors for the output layer {shorten(output_layer)}, which all-linear "
            f"leaves out: PEFT, and so the gate, would ignore them ({root})",
            fix="list the modules in target_modules, or remove the output layer's tensors")


def saved_modules(adapter_dir: Path) -> set[str] | None:
    """The modules ``adapter_model.safetensors`` holds LoRA tensors for (None: no such file)."""
    from registry.formats.safetensors_header import read_header
    from registry.ingest import WEIGHTS_NAME

    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        return None
    return {key.rsplit(".lora_", 1)[0] for key in read_header(path).tensors if ".lora_" in key}


def check_random_init_covered(root: Path, config: Mapping[str, Any], peft_model: Any,
                              saved: Iterable[str] | None) -> None:
    """Refuse a loaded PEFT model whose random-initialised LoRA modules the file leaves out.

    With ``init_lora_weights: false`` PEFT draws *both* factors at random (``B`` too), so a
    module the config targets but the file holds no tensors for keeps a random, non-zero
    delta: the gate would score noise that ``unload`` and merge (which see no tensors)
    never apply. With the default initialisation ``B`` is zero and such a module adds
    nothing, as everywhere else.

    Args:
        root: The adapter directory (for the message).
        config: Its ``adapter_config.json``.
        peft_model: The ``PeftModel`` loaded from it (adapter ``default``).
        saved: The module names the file holds LoRA tensors for (``base_model.model.…``;
            None: unknown, nothing is checked).

    Raises:
        UnsupportedAdapterError: Such a module exists.
    """
    if config.get("init_lora_weights") is not False or saved is None:
        return
    groups: dict[int, list[str]] = {}  # one entry per set of factors: a tied pair shares one
    for name, module in peft_model.named_modules():
        factors = getattr(module, "lora_A", None) or getattr(module, "lora_embedding_A", None)
        if factors is not None and "default" in factors:
            first = factors["default"]
            groups.setdefault(id(getattr(first, "weight", first)), []).append(name)
    held = set(saved)
    missing = sorted(names[0] for names in groups.values() if not held.intersection(names))
    if missing:
        raise UnsupportedAdapterError(
            f"init_lora_weights is false and the file holds no LoRA tensors for "
            f"{shorten(strip_prefix(missing[0]))} ({len(missing)} module(s)): PEFT gives them "
            f"random factors, which nothing else applies ({root})",
            fix="save the adapter with PeftModel.save_pretrained, or set init_lora_weights: true")
