"""Reading and checking the inputs of a merge, before any arithmetic.

* :func:`check_bases`: the inputs' recorded base fingerprints agree (registry merges);
* :func:`check_compatible`: their configs and module shapes agree (every merge);
* :func:`copied_extras`: ``modules_to_save`` tensors, copied, clashes refused;
* :func:`module_inputs`: one module's factors as float32 :class:`ModuleInput` (scale folded
  into ``B``), non-finite values refused naming the input and module;
* :func:`module_union`, :func:`output_dtype`: what the output holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from merging.adapter import LoraAdapter
from merging.dtypes import torch_dtype
from merging.lora.methods import ModuleInput
from registry.errors import BadInputError, BaseMismatchError, MergeRangeError, UnsupportedAdapterError


def module_union(adapters: Sequence[LoraAdapter]) -> list[str]:
    """Sorted union of the inputs' module paths."""
    return sorted(set().union(*(a.infos for a in adapters)))

def check_compatible(adapters: Sequence[LoraAdapter], labels: Sequence[str]) -> list[str]:
    warnings: list[str] = []
    first = adapters[0].config
    for adapter, label in zip(adapters[1:], labels[1:], strict=True):
        cfg = adapter.config
        if bool(cfg.get("fan_in_fan_out", False)) != bool(first.get("fan_in_fan_out", False)):
            raise BadInputError(f"{label} and {labels[0]} disagree on fan_in_fan_out",
                                fix="merge adapters trained on the same model class")
        for field in ("base_model_name_or_path", "task_type"):
            if cfg.get(field) != first.get(field):
                warnings.append(f"{field} differs: {labels[0]} has {first.get(field)!r}, "
                                f"{label} has {cfg.get(field)!r}; the output keeps the first")
    seen: dict[str, tuple[str, tuple[int, int], bool]] = {}
    for adapter, label in zip(adapters, labels, strict=True):
        for name, info in adapter.infos.items():
            if name in seen and seen[name][1:] != (info.shape, info.embedding):
                other, shape, _ = seen[name]
                raise BaseMismatchError(
                    f"module {name}: {other} has delta shape {shape} but {label} has {info.shape}",
                    fix="merge adapters trained on the same base model")
            seen.setdefault(name, (label, info.shape, info.embedding))
    return warnings

def output_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {info.dtype for a in adapters for info in a.infos.values()}
    out = torch_dtype(dtypes.pop())
    for name in dtypes:
        out = torch.promote_types(out, torch_dtype(name))
    return out

def module_inputs(adapters: Sequence[LoraAdapter], weights: Sequence[float], labels: Sequence[str],
                  name: str, device: torch.device) -> list[ModuleInput]:
    """Module ``name``'s factors in each input that has it (float32, scale folded into ``B``).

    Raises:
        BadInputError: NaN or infinite factors, or finite ones whose delta ``s·B·A``
            does not fit float32 (every merge computes the deltas in float32).
    """
    inputs = []
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        if name not in adapter.infos:
            continue
        module = adapter.module(name)
        a = module.A.float()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(module.B).all())):
            raise BadInputError(f"{labels[index]}: module {name} has NaN or infinite values",
                                fix="check the adapter's training run")
        b = module.B.float() * module.scale
        peak = delta_bound(b, a)
        if not peak <= FLOAT32_SAFE:
            raise BadInputError(f"{labels[index]}: module {name}: its delta s·B·A overflows "
                                f"float32 (entries up to {peak:.3g} with scale {module.scale:.3g})",
                                fix="check the adapter's lora_alpha and factors")
        inputs.append(ModuleInput(index=index, B=b.to(device), A=a.to(device), weight=weight))
    return inputs


FLOAT32_SAFE = torch.finfo(torch.float32).max / 2
"""Largest ``Σ_k |b_ik a_kj|`` accepted: any float32 summation of the delta stays finite."""


def delta_bound(b: torch.Tensor, a: torch.Tensor) -> float:
    """An upper bound of every partial sum of ``b @ a``'s entries (float64; ``inf`` if unbounded).

    ``Σ_k |b_ik a_kj| <= ||b_i|| ||a_j||`` (Cauchy-Schwarz): the cheap bound, enough for
    real adapters; only when it is too large are the sums of absolute products formed
    (by row blocks) to decide.
    """
    rows = torch.linalg.vector_norm(b, dim=1, dtype=torch.float64)
    cols = torch.linalg.vector_norm(a, dim=0, dtype=torch.float64)
    if rows.numel() == 0 or cols.numel() == 0:
        return 0.0
    cheap = float(rows.max()) * float(cols.max())
    if cheap <= FLOAT32_SAFE:
        return cheap
    abs_a = a.double().abs()
    return max(float((b[r].double().abs() @ abs_a).max()) for r in
               (slice(i, i + 256) for i in range(0, b.shape[0], 256)))


def copied_extras(adapters: Sequence[LoraAdapter], labels: Sequence[str],
            warnings: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, list[str]] = {}
    for adapter, label in zip(adapters, labels, strict=True):
        for key in adapter.extras:
            tensor = adapter.extra_tensor(key)
            if key in out:
                if out[key].dtype != tensor.dtype or out[key].shape != tensor.shape \
                        or not torch.equal(out[key], tensor):
                    raise UnsupportedAdapterError(
                        f"{owner[key][0]} and {label} both carry {key} (modules_to_save) with "
                        "different values; full weights cannot be merged",
                        fix="retrain one adapter without modules_to_save for that module, or "
                            "drop it from one input")
                owner[key].append(label)
            else:
                out[key] = tensor.contiguous()
                owner[key] = [label]
    for key, who in sorted(owner.items()):
        if len(who) < len(adapters):
            warnings.append(f"{key} is copied from {', '.join(who)} only; the other inputs "
                            "used the base model's tensor there")
    return out

def check_bases(bases: Sequence[dict[str, Any] | None], labels: Sequence[str], *,
                allow_weights_mismatch: bool = False) -> list[str]:
    """Check that the inputs were trained on the same base model.

    Args:
        bases: Each input's record ``base_model`` object (``{"id", "revision",
            "fingerprint": {"struct_digest", "weights_digest"} | None}``) or None.
        labels: Names of the inputs for messages.
        allow_weights_mismatch: Accept the same structure with different weights
            (e.g. a base and its fine-tune), as a warning.

    Returns:
        Warnings (unverifiable inputs, accepted weights mismatch) for the lineage.

    Raises:
        BaseMismatchError: Different ``struct_digest`` (never allowed), or different
            ``weights_digest`` without ``allow_weights_mismatch``.
    """
    warnings: list[str] = []
    known: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for base, label in zip(bases, labels, strict=True):
        fp = (base or {}).get("fingerprint")
        if not fp or not fp.get("struct_digest"):
            warnings.append(f"{label}: no base fingerprint recorded; its base could not be verified")
            continue
        known.append((label, base or {}, fp))
    for label, base, fp in known[1:]:
        ref_label, ref_base, ref_fp = known[0]
        names = f"{ref_label} (base {ref_base.get('id')!r}) and {label} (base {base.get('id')!r})"
        if fp["struct_digest"] != ref_fp["struct_digest"]:
            raise BaseMismatchError(
                f"{names} were trained on bases of different structure "
                f"({ref_fp['struct_digest'][:19]} vs {fp['struct_digest'][:19]})",
                fix="merge adapters of the same base model")
        wa, wb = ref_fp.get("weights_digest"), fp.get("weights_digest")
        if wa and wb and wa != wb:
            message = (f"{names} share the base structure but not its weights "
                       f"({wa[:19]} vs {wb[:19]})")
            if not allow_weights_mismatch:
                raise BaseMismatchError(message, fix="pass --allow-base-mismatch to merge anyway")
            warnings.append(message + "; merged anyway (--allow-base-mismatch)")
    return warnings


def overflow_error(modules: Sequence[str]) -> MergeRangeError:
    """The error for merged deltas that left float32's range (weights or lambda too large)."""
    shown = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
    return MergeRangeError(f"the merged delta of {shown} overflows float32 (weights or lambda too "
                           "large?)", fix="use smaller --weights or --lambda for these adapters")


def finite_factors(module: str, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, a)`` as cast to the output dtype, if every entry is finite.

    Raises:
        MergeRangeError: An entry overflowed the output dtype (float16 inputs whose merge
            has singular values above ~4e9).
    """
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise MergeRangeError(f"module {module}: the merged factors do not fit {str(b.dtype).removeprefix('torch.')}, "
                              "the inputs' dtype (weights or lambda too large?)",
                              fix="use smaller --weights or --lambda, or merge adapters saved in "
                                  "float32 or bfloat16")
    return b, a

