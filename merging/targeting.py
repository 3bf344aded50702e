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

``target_modules`` of ``null`` or ``"all-linear"`` are resolved by PEFT from the model,
which is not known here; such configs are not checked (PEFT writes the resolved list
when it saves an adapter).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merging.tied import ModuleShape, tied_pair
from registry.errors import UnsupportedAdapterError, shorten
from registry.formats.patterns import module_targeted
from registry.formats.peft_keys import PEFT_PREFIX, strip_prefix

UNRESOLVED_TARGETS = (None, "all-linear")
"""``target_modules`` values PEFT resolves against the model (not checked here)."""


def check_targeted(root: Path, config: Mapping[str, Any], infos: Mapping[str, ModuleShape]) -> None:
    """Refuse LoRA modules in the file that PEFT would not load (module docstring).

    Raises:
        UnsupportedAdapterError: A module key without PEFT's prefix, or one the config
            does not select.
        BadInputError: A config pattern that cannot be matched in linear time.
    """
    if config.get("target_modules") in UNRESOLVED_TARGETS:
        return
    pair = tied_pair(config, infos)
    for name in infos:
        if not name.startswith(PEFT_PREFIX):
            raise UnsupportedAdapterError(
                f"LoRA tensors of {shorten(name)} lack PEFT's {PEFT_PREFIX!r} prefix, so PEFT "
                f"(and the gate) would not load them ({root})",
                fix="re-save the adapter with PeftModel.save_pretrained")
        if pair is not None and name == pair.head:
            continue  # ensure_weight_tying adds lm_head to the embedding's LoRA
        if not module_targeted(config, strip_prefix(name)):
            raise UnsupportedAdapterError(
                f"LoRA tensors for {shorten(strip_prefix(name))}, which the config does not "
                "select: PEFT, and so the gate, would ignore them (target_modules, "
                f"exclude_modules, layers_to_transform, modules_to_save; {root})",
                fix="add the module to target_modules if it was trained, or remove its tensors")
