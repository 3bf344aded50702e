"""TIES and magnitude_prune on a device (CUDA or CPU), several modules at a time.

:mod:`merging.lora.sparsify` merges a module on the CPU block by block, never holding
more than one dense delta, and finds each trim threshold by sampling plus a
``kthvalue`` on the bracketed entries. On a GPU the constraints are reversed:
memory is plentiful (a 7B-shaped module's two deltas are 360 MB), launches and
host round-trips are what cost, and ``kthvalue``/``sort`` on tens of millions of
entries dominate. So here:

* the inputs' factors of a *group* of same-shaped modules are stacked (ranks
  zero-padded to the largest), copied
  once (from pinned memory, without blocking) and multiplied in one batched
  matmul into a ``(modules, inputs, out, in)`` float32 stack of true deltas;
* every threshold of the group comes from one radix select
  (:func:`merging.lora.kselect.kth_largest_magnitudes`: exact, integer counting, the
  same value ``kthvalue`` gives) and the trim is :func:`merging.lora.kselect.keep_mask`,
  the mask :func:`merging.lora.sparsify.trim_block` applies;
* the sign election and disjoint mean are :func:`merging.lora.sparsify.elect_and_merge`
  itself (element-wise, so it runs on whatever device its tensors are on), and
  magnitude_prune's sum is :func:`merging.lora.sparsify.weighted_sum`.

The deltas are full products rather than 64-row blocks, so on the CPU they can
round differently from :mod:`merging.lora.sparsify` in the last bit (exactly equal when
the products are exact, as the tests check); on one device the result is
deterministic: no atomics on floats, no sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merging.lora import sparsify
from merging.lora.kselect import keep_mask, kth_largest_magnitudes
from merging.lora.methods import MergeParams, ModuleInput


def _stacked(factors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    stack = torch.stack(factors)
    if device.type == "cuda":
        return stack.pin_memory().to(device, non_blocking=True)
    return stack.to(device)


def group_deltas(group: Sequence[Sequence[ModuleInput]], device: torch.device | str) -> torch.Tensor:
    """The true deltas ``B_i A_i`` of a group of modules: ``(modules, inputs, out, in)`` float32.

    Args:
        group: Per module, its inputs (scale folded into ``B``); every module has
            the same number of inputs and shape. Ranks may differ: factors are
            zero-padded to the largest (finite inputs: adding ``0·x`` changes no sum,
            though the summation order of the matmul may).
        device: Where to compute.

    Raises:
        ValueError: An empty group, or modules with different input counts or shapes.
    """
    device = torch.device(device)
    flat = [inp for inputs in group for inp in inputs]
    counts = {len(inputs) for inputs in group}
    if not flat or len(counts) != 1 or len({(i.B.shape[0], i.A.shape[1]) for i in flat}) != 1:
        raise ValueError("a group holds modules with the same input count and shape")
    rank = max(inp.A.shape[0] for inp in flat)
    pad = torch.nn.functional.pad
    B = _stacked([pad(inp.B.float(), (0, rank - inp.B.shape[1])) for inp in flat], device)
    A = _stacked([pad(inp.A.float(), (0, 0, 0, rank - inp.A.shape[0])) for inp in flat], device)
    deltas = torch.bmm(B, A)
    return deltas.view(len(group), counts.pop(), *deltas.shape[1:])


def trim_group(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each delta's top ``int(density · numel)`` magnitudes, in place (ties kept).

    Args:
        deltas: ``(..., out, in)`` float32; every ``(out, in)`` matrix is trimmed on its own.
        density: Fraction kept; ``>= 1`` keeps everything.

    Returns:
        ``deltas``, with the entries :func:`merging.lora.sparsify.trim_block` zeroes set to 0.
    """
    if density >= 1:
        return deltas
    rows, cols = deltas.shape[-2:]
    flat = deltas.view(-1, rows, cols)
    thresholds = kth_largest_magnitudes(flat, sparsify.keep_count(density, rows * cols))
    flat.masked_fill_(keep_mask(flat, thresholds).logical_not_(), 0.0)
    return deltas


def merge_group(group: Sequence[Sequence[ModuleInput]], params: MergeParams, *,
                elect: bool, device: torch.device | str) -> torch.Tensor:
    """TIES (``elect=True``) or magnitude_prune of a group of modules on ``device``.

    Args:
        group: Per module, its inputs (see :func:`group_deltas`); the weights are
            the inputs' own, position by position.
        params: Resolved parameters (``density``, ``lam``, ``sign_election``;
            ``normalize`` and ``weight_sum`` for magnitude_prune).
        elect: Sign election and disjoint mean (TIES) instead of a weighted sum.
        device: Where to compute.

    Returns:
        ``(modules, out, in)`` float32 merged deltas on ``device``; module ``m``
        is what ``ties``/``magnitude_prune`` return for ``group[m]``.

    Raises:
        ValueError: See :func:`group_deltas`.
    """
    deltas = trim_group(group_deltas(group, device), params.density)
    normalize = params.normalize and not elect
    factor = params.lam / (params.weight_sum if normalize else 1.0)
    merged = []
    for m, inputs in enumerate(group):
        parts = list(deltas[m].unbind(0))
        weights = [inp.weight for inp in inputs]
        if elect:
            out = sparsify.elect_and_merge(parts, weights, params.sign_election)
        else:
            out = sparsify.weighted_sum(parts, weights)
        merged.append(out.mul_(factor) if factor != 1.0 else out)
    return torch.stack(merged)


def group_by_shape(shapes: dict[str, tuple[int, int]], max_entries: int,
                   inputs_of: dict[str, tuple[int, ...]] | None = None) -> list[list[str]]:
    """Module names in groups that :func:`merge_group` can take, each of bounded size.

    Args:
        shapes: Module name -> ``(out, in)``.
        max_entries: Most delta entries (all inputs counted) a group holds; a module
            larger than that is a group of its own.
        inputs_of: Module name -> the indices of the inputs that have it (modules
            are grouped only with modules of the same inputs); None: all the same.

    Returns:
        Groups of names, sorted by name within a group, in order of first name.
    """
    by_kind: dict[tuple[tuple[int, int], tuple[int, ...]], list[str]] = {}
    for name in sorted(shapes):
        kind = (shapes[name], (inputs_of or {}).get(name, ()))
        by_kind.setdefault(kind, []).append(name)
    groups: list[list[str]] = []
    for (shape, used), names in by_kind.items():
        size = math.prod(shape) * max(1, len(used))
        per_group = max(1, max_entries // size)
        groups.extend(names[i:i + per_group] for i in range(0, len(names), per_group))
    return sorted(groups)
