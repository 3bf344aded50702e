"""The entry-wise steps of dense merges on a group of same-shaped modules at once.

Each step takes the group's ``(modules, inputs, out, in)`` float32 true deltas (from
:func:`merging.lora.device_trim.group_deltas`) and changes them in place, exactly as the
per-module step of :mod:`merging.lora.sparsify` changes one module's deltas:

* :func:`trim_group` (TIES, magnitude_prune): every threshold of the group from one radix
  select (:func:`merging.lora.kselect.kth_largest_magnitudes`: exact, the value
  ``kthvalue`` gives), the mask :func:`merging.lora.sparsify.trim_block` applies;
* :func:`band_group` (Breadcrumbs): both band edges by radix select;
* :func:`dare_group` (DARE): the masks drawn from the per-module path's own generators
  (one per module, input and 64-row block, on the CPU), many side by side on
  single-threaded workers, copied to the device once per group.

The methods name their step in their :class:`merging.lora.methods.GroupedForm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.lora import sparsify
from merging.lora.kselect import keep_mask, kth_largest_magnitudes
from merging.lora.methods import MergeParams, ModuleContext, ModuleInput
from merging.threads import worker_pool


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


def band_group(deltas: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep each delta's Breadcrumbs band, in place: the ``int(density · n)`` magnitudes
    after the ``min(int(gamma · n), n - k)`` largest, edges included, as
    :func:`merging.lora.sparsify.outlier_band` and ``band_block`` keep them.

    Args:
        deltas: ``(..., out, in)`` float32; every ``(out, in)`` matrix is banded on its own.
        density: Fraction kept; ``>= 1`` keeps everything (gamma ignored, as mergekit).
        gamma: Fraction of the largest magnitudes dropped as outliers.

    Returns:
        ``deltas``.
    """
    if density >= 1:
        return deltas
    rows, cols = deltas.shape[-2:]
    numel = rows * cols
    flat = deltas.view(-1, rows, cols)
    k = sparsify.keep_count(density, numel)
    if k <= 0:
        return deltas.zero_()
    top = min(int(gamma * numel), numel - k)
    keep = keep_mask(flat, kth_largest_magnitudes(flat, top + k))
    if top > 0:
        hi = kth_largest_magnitudes(flat, top + 1)
        keep.logical_and_(flat.abs() <= hi[:, None, None])
    flat.masked_fill_(keep.logical_not_(), 0.0)
    return deltas


def dare_masks(group: Sequence[Sequence[ModuleInput]], contexts: Sequence[ModuleContext],
               density: float) -> torch.Tensor:
    """DARE's keep masks of a group: ``(modules, inputs, out, in)`` bool on the CPU.

    Row block ``j`` of input ``i`` in module ``m`` is ``torch.rand(...) < density`` from
    :func:`merging.lora.sparsify.dare_generator` (``contexts[m]``, the input's index,
    ``j``): the per-module path's draws exactly. Blocks are drawn side by side on
    single-threaded workers (each has its own generator, so the order does not matter).
    """
    rows, cols = contexts[0].shape
    keep = torch.empty((len(group), len(group[0]), rows, cols), dtype=torch.bool)
    jobs = [(m, i, j, block) for m, inputs in enumerate(group) for i in range(len(inputs))
            for j, block in enumerate(sparsify.row_blocks(rows))]

    def draw(job: tuple[int, int, int, slice]) -> None:
        m, i, j, block = job
        gen = sparsify.dare_generator(contexts[m], group[m][i].index, j)
        torch.lt(torch.rand((block.stop - block.start, cols), generator=gen), density,
                 out=keep[m, i, block])

    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        for job in jobs:
            draw(job)
    else:
        with worker_pool(workers) as pool:
            list(pool.map(draw, jobs))
    return keep


def dare_group(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
               contexts: Sequence[ModuleContext], density: float) -> torch.Tensor:
    """Drop and rescale each delta with DARE's masks (:func:`dare_masks`), in place:
    ``delta · keep / density``, the per-module ``dare_block`` step. ``density >= 1``
    keeps everything and draws nothing."""
    if density >= 1.0:
        return deltas
    return deltas.mul_(_stacked_masks(dare_masks(group, contexts, density), deltas.device)).div_(density)


def _stacked_masks(keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return keep.pin_memory().to(device, non_blocking=True)
    return keep.to(device)


def trim_select(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
                contexts: Sequence[ModuleContext], params: MergeParams) -> None:
    """TIES's and magnitude_prune's step (:data:`merging.lora.methods.GroupSelectFn`)."""
    trim_group(deltas, params.density)
