"""PEFT's module-name patterns, matched in linear time (the one place adapterkit does it).

An adapter config carries regular expressions: ``rank_pattern`` / ``alpha_pattern`` keys,
``target_modules`` and ``exclude_modules`` given as a string, ``layers_pattern`` and the
``modules_to_save`` names, which PEFT splices into its own expressions. They come from
untrusted files, and Python's backtracking ``re`` takes exponential time on patterns such
as ``(a|aa)+`` or ``(a+)+$`` (the issue's 44-character name ran for over 90 s). Every such
pattern is therefore matched here, with RE2 (``google-re2``), whose running time is linear
in the name whatever the pattern.

The matching itself is :mod:`registry.formats.linear_regex` (Python's parser, RE2's
engine); this module holds PEFT's rules: how each config field is spliced into an
expression, exactly as PEFT does, and which modules a config therefore targets.
Constructs RE2 cannot run in linear time are refused with a
:class:`~registry.errors.BadInputError` naming the field and the (truncated) pattern;
ingest calls :func:`check_config_patterns` so such an adapter never enters a store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from registry.errors import BadInputError
from registry.formats.linear_regex import check_module_name, linear_regex, show

# --- PEFT's rules --------------------------------------------------------------------------


def _key_expression(key: str) -> str:
    return rf"(.*\.)?({key})$"  # peft.utils.other.get_pattern_key


def _layer_expression(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."  # tuners_utils.check_target_module_exists


def _saved_expression(module: str) -> str:
    return rf"(^|.*\.){module}($|\..*)"  # tuners_utils.check_target_module_exists


def pattern_key(keys: Iterable[str], name: str, field: str = "rank_pattern") -> str | None:
    """The first key PEFT's ``get_pattern_key`` would pick for ``name``, or None.

    ``name`` is the module name without ``base_model.model.``; key ``K`` matches when
    ``re.match(rf"(.*\\.)?({K})$", name)`` would.

    Raises:
        BadInputError: a key is invalid or cannot be matched in linear time.
    """
    check_module_name(name)
    for key in keys:
        if linear_regex(_key_expression(key), key, field)[0].match(name):
            return key
    return None


def fullmatch(pattern: str, name: str, field: str = "target_modules") -> bool:
    """``re.fullmatch(pattern, name)`` (a string ``target_modules`` / ``exclude_modules``).

    Raises:
        BadInputError: the pattern is invalid or cannot be matched in linear time.
    """
    return linear_regex(pattern, pattern, field)[0].fullmatch(check_module_name(name)) is not None


def layer_index(layers_pattern: str | Sequence[str] | None, name: str) -> int | None:
    """The layer index PEFT reads from ``name`` for ``layers_to_transform``, or None.

    Raises:
        BadInputError: a pattern is invalid or cannot be matched in linear time.
    """
    check_module_name(name)
    if not layers_pattern:
        regex, groups = linear_regex(r".*?\.[^.]*\.(?P<idx>\d+)\.", "", "layers_pattern")
        found = regex.match(name)
        return int(found.group(groups["idx"])) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        regex, groups = linear_regex(_layer_expression(pattern), pattern, "layers_pattern")
        found = regex.match(name)
        if found:
            return int(found.group(groups["idx"]))
    return None


def module_targeted(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT's ``check_target_module_exists(config, name)`` is truthy.

    Args:
        config: A LoRA ``adapter_config.json`` (``target_modules``, ``exclude_modules``,
            ``modules_to_save``, ``layers_to_transform``, ``layers_pattern``).
        name: A module name of the base model (``model.layers.0.self_attn.q_proj``).

    Raises:
        BadInputError: a pattern is invalid or cannot be matched in linear time.
    """
    check_module_name(name)
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if fullmatch(exclude, name, "exclude_modules"):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    for module in config.get("modules_to_save") or ():
        if linear_regex(_saved_expression(module), module, "modules_to_save")[0].match(name):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return fullmatch(targets, name)
    if name in targets:
        return True
    found = any(name.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (layers != [] if isinstance(layers, list) else True):
        index = layer_index(config.get("layers_pattern"), name)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,256}")


ALL_LINEAR = "all-linear"


def is_all_linear(targets: Any) -> bool:
    """Whether ``target_modules`` is PEFT's ``all-linear`` keyword (PEFT lowercases it first)."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR
"""PEFT's ``target_modules`` keyword: every Linear/Conv1D module but the output layer."""


def explicit_peft_config(config: Mapping[str, Any], module_names: Iterable[str],
                         linear: Iterable[str] = ()) -> dict[str, Any]:
    """The same adapter config with every pattern replaced by explicit module names.

    PEFT matches ``target_modules``, ``exclude_modules``, ``layers_pattern``,
    ``rank_pattern``/``alpha_pattern`` keys and ``modules_to_save`` with Python's ``re``
    when it loads an adapter, so a pattern that RE2 runs in linear time can still make
    PEFT backtrack for minutes. Here the targeted modules are decided with RE2
    (:func:`module_targeted`, :func:`pattern_key`) and PEFT gets only literal names:
    ``target_modules`` as a list (PEFT compares list entries by name, no regex), rank
    and alpha keys as the escaped full names, no exclusions or layer filters left.

    Args:
        config: The adapter's ``adapter_config.json``.
        module_names: Every module name of the base model (``model.named_modules()``).
        linear: The names of its Linear/Conv1D modules but the output layer: what
            ``target_modules: all-linear`` selects (the keyword was read as a regex that
            matched nothing, and every check of such an adapter ended in an error).

    Raises:
        BadInputError: A pattern is invalid, or a ``modules_to_save`` entry is not a
            plain module name.
    """
    names = list(module_names)
    if is_all_linear(config.get("target_modules")):
        linear_names = set(linear)
        targeted = sorted(n for n in names if n in linear_names
                          and module_targeted({**config, "target_modules": [n]}, n))
    else:
        targeted = sorted(n for n in names if n and module_targeted(config, n))
    out = dict(config)
    out.update(target_modules=targeted, exclude_modules=None, layers_to_transform=None,
               layers_pattern=None)
    for field in ("rank_pattern", "alpha_pattern"):
        keys = list((config.get(field) or {}).keys())
        chosen = {n: pattern_key(keys, n, field) for n in targeted} if keys else {}
        out[field] = {re.escape(n): config[field][k] for n, k in chosen.items() if k is not None}
    for module in config.get("modules_to_save") or ():
        if not isinstance(module, str) or not _PLAIN_NAME.fullmatch(module):
            raise BadInputError(f"modules_to_save entry {show(str(module))} is not a module name",
                                fix="list modules to save by name (e.g. lm_head)")
    return out


def check_config_patterns(config: Mapping[str, Any], *,
                          source: str = "adapter_config.json: ") -> None:
    """Refuse a config whose patterns are invalid or cannot be matched in linear time.

    Checks what PEFT treats as a regular expression: ``rank_pattern`` / ``alpha_pattern``
    keys, a string ``target_modules`` / ``exclude_modules``, ``layers_pattern`` and the
    ``modules_to_save`` names, each in the expression PEFT splices it into.

    Args:
        config: An ``adapter_config.json`` or a record's ``peft`` object.
        source: Message prefix naming where the fields are (``"record field peft."``).

    Raises:
        BadInputError: names the field and the pattern (truncated).
    """
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            if isinstance(key, str):
                linear_regex(_key_expression(key), key, field, source)
    for field in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field), str):
            linear_regex(config[field], config[field], field, source)
    layers = config.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers or ():
        if isinstance(pattern, str):
            linear_regex(_layer_expression(pattern), pattern, "layers_pattern", source)
    for module in config.get("modules_to_save") or ():
        if isinstance(module, str):
            linear_regex(_saved_expression(module), module, "modules_to_save", source)
