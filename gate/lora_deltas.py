"""A LoRA adapter's true weight deltas ``s·B·A``, read without PEFT.

Merge equivalence rebuilds "base + Σ c_i ΔW_i" from the parents' files by hand
(:meth:`gate.evaluate.Evaluator.with_deltas`) so it does not trust the code it
checks. The scale follows PEFT exactly (``lora_alpha`` with ``alpha_pattern``, over
``r`` or ``sqrt(r)`` for rsLoRA); embeddings and ``fan_in_fan_out`` layers are
transposed to the weight's layout. What has no plain weight delta (DoRA, LoRA
biases, ``modules_to_save`` copies) is refused rather than approximated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import UnsupportedAdapterError
from registry.formats.peft_keys import base_weight_key
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _scales(config: dict[str, Any], module: str, rank: int) -> float:
    from registry.formats.peft_keys import alpha_for

    alpha = alpha_for(module, config.get("lora_alpha", 8), config.get("alpha_pattern"))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _unchanged_copy(name: str, tensor: torch.Tensor, base: dict[str, Any] | None) -> bool:
    import torch

    key = base_weight_key(name.removesuffix(".base_layer.weight")) if name.endswith(
        ".base_layer.weight") else None
    held = (base or {}).get(key) if key else None
    return held is not None and torch.equal(tensor.to(held.dtype), held.detach().cpu())


def lora_deltas(adapter_dir: Path, conv1d: set[str] | None = None,
                base: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Base weight key -> the adapter's true delta ``s·B·A`` (float32), shaped like the weight.

    ``modules_to_save`` copies are not deltas and are refused, as are DoRA and LoRA
    biases (their effect is not a weight delta). ``conv1d``: the base's ``Conv1D`` weight
    keys, when known: PEFT transposes those (``fan_in_fan_out``) and no others, whatever
    the flag says; without it the flag decides. ``base``: the base's parameters by weight
    key; PEFT's saved copies of an adapted embedding's or ``lm_head``'s base weight
    (``.base_layer.weight``) equal to them are no change and are skipped.

    Raises:
        UnsupportedAdapterError: DoRA, lora_bias or modules_to_save tensors.
        BadInputError: Malformed adapter files.
    """
    import torch
    from safetensors.torch import load_file

    from registry.formats.peft_keys import split_keys

    config = loads_json((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    modules, extras = split_keys(tensors)
    extras = [e for e in extras if not _unchanged_copy(e, tensors[e], base)]
    if extras or config.get("use_dora") or config.get("lora_bias"):
        raise UnsupportedAdapterError(
            f"{adapter_dir}: DoRA, lora_bias or modules_to_save have no plain weight delta",
            fix="merge equivalence needs plain LoRA parents")
    out: dict[str, torch.Tensor] = {}
    for module, keys in modules.items():
        a, b = tensors[keys.a].to(torch.float32), tensors[keys.b].to(torch.float32)
        delta = (b @ a) * _scales(config, module, a.shape[0])
        key = base_weight_key(module)
        flagged = key in conv1d if conv1d is not None else bool(config.get("fan_in_fan_out"))
        if keys.embedding or flagged:
            delta = delta.T
        out[key] = delta
    return out
