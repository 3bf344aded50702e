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

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from merging.lora import sparsify
from merging.lora.kselect import keep_mask, kth_largest_magnitudes
from merging.lora.methods import ModuleContext, ModuleInput
from merging.threads import block_map


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


DEVICE_DRAW_BYTES = 1 << 30
"""DARE's uniform draws kept on a device between merges, at most (least recently used
dropped first). A merge search merges the same inputs dozens of times with one seed, and
the draws depend on the seed, module, input and shape, never on the density."""


class _DrawCache:
    """A byte-bounded LRU of device tensors; thread-safe (merges may run side by side)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.kept: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> torch.Tensor | None:
        with self.lock:
            found = self.kept.pop(key, None)
            if found is not None:
                self.kept[key] = found
            return found

    def put(self, key: tuple[object, ...], tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self.lock:
            if size > self.limit or key in self.kept:
                return
            self.kept[key] = tensor
            self.used += size
            while self.used > self.limit:
                _, old = self.kept.popitem(last=False)
                self.used -= old.numel() * old.element_size()


DEVICE_DRAWS = _DrawCache(DEVICE_DRAW_BYTES)


def _draw_blocks(pairs: Sequence[tuple[ModuleContext, int]], out: torch.Tensor,
                 fill: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
    """For each ``(module, input index)`` of ``pairs``, its DARE draws block by block (the
    per-module path's generators), handed to ``fill(draws, out[p, block])``; blocks side by
    side on single-threaded workers (each has its own generator: order does not matter)."""
    rows, cols = pairs[0][0].shape
    jobs = [(p, j, block) for p in range(len(pairs)) for j, block in enumerate(sparsify.row_blocks(rows))]

    def draw(_n: int, job: tuple[int, int, slice]) -> None:
        p, j, block = job
        ctx, index = pairs[p]
        gen = sparsify.dare_generator(ctx, index, j)
        fill(torch.rand((block.stop - block.start, cols), generator=gen), out[p, block])

    block_map(draw, jobs)


def device_draws(group: Sequence[Sequence[ModuleInput]], contexts: Sequence[ModuleContext],
                 device: torch.device) -> torch.Tensor:
    """DARE's uniform draws of a group on ``device``: ``(modules, inputs, out, in)`` float32,
    the very values :func:`dare_masks` compares (drawn on the CPU, copied once), kept in
    :data:`DEVICE_DRAWS` for the next merge of the same modules with the same seed."""
    keys = [[(ctx.seed, ctx.name, inp.index, ctx.shape, str(device)) for inp in inputs]
            for ctx, inputs in zip(contexts, group, strict=True)]
    found = [[DEVICE_DRAWS.get(key) for key in row] for row in keys]
    missing = [(m, i) for m, row in enumerate(found) for i, t in enumerate(row) if t is None]
    if missing:
        rows, cols = contexts[0].shape
        fresh = torch.empty((len(missing), rows, cols), dtype=torch.float32)
        _draw_blocks([(contexts[m], group[m][i].index) for m, i in missing], fresh,
                     lambda draws, out: out.copy_(draws))
        moved = to_device(fresh, device)
        for p, (m, i) in enumerate(missing):
            found[m][i] = moved[p]
            DEVICE_DRAWS.put(keys[m][i], moved[p].clone())  # its own storage: the batch is freed
    return torch.stack([torch.stack([t for t in row if t is not None]) for row in found])


def dare_masks(group: Sequence[Sequence[ModuleInput]], contexts: Sequence[ModuleContext],
               density: float) -> torch.Tensor:
    """DARE's keep masks of a group: ``(modules, inputs, out, in)`` bool on the CPU.

    Row block ``j`` of input ``i`` in module ``m`` is ``torch.rand(...) < density`` from
    :func:`merging.lora.sparsify.dare_generator` (``contexts[m]``, the input's index,
    ``j``): the per-module path's draws exactly. Blocks are drawn side by side on
    single-threaded workers (each has its own generator, so the order does not matter).
    """
    rows, cols = contexts[0].shape
    inputs = len(group[0])
    keep = torch.empty((len(group) * inputs, rows, cols), dtype=torch.bool)
    _draw_blocks([(ctx, inp.index) for ctx, module in zip(contexts, group, strict=True) for inp in module],
                 keep, lambda draws, out: torch.lt(draws, density, out=out))
    return keep.view(len(group), inputs, rows, cols)


def dare_group(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
               contexts: Sequence[ModuleContext], density: float) -> torch.Tensor:
    """Drop and rescale each delta with DARE's masks (:func:`dare_masks`), in place:
    ``delta · keep / density``, the per-module ``dare_block`` step. ``density >= 1``
    keeps everything and draws nothing. Off the CPU the draws come from
    :func:`device_draws` (kept between merges) and are compared there."""
    if density >= 1.0:
        return deltas
    if deltas.device.type == "cpu":
        keep = dare_masks(group, contexts, density)
    else:
        keep = device_draws(group, contexts, deltas.device) < density
    return deltas.mul_(keep).div_(density)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to CUDA from pinned memory, without blocking the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
