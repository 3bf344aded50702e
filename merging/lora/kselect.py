"""Exact k-th largest magnitude without sorting: radix select on float32 bit patterns.

The TIES/magnitude-prune trim keeps the ``k`` entries of largest magnitude, i.e.
every entry with ``|x| >= t`` where ``t`` is the k-th largest ``|x|``
(:mod:`merging.lora.sparsify`; entries tied with ``t`` are all kept). ``torch.kthvalue``
finds ``t`` by a selection that is slow on large tensors and, on CUDA, sorts: on
45M entries it dominated a GPU TIES merge. This module finds the same ``t``
with integer counting only, on any device and for a batch of tensors at once.

**Why integers.** The IEEE-754 bit pattern of a non-negative float32, read as an
int32, is ordered like the value (``+0 < denormals < normals < inf < NaN``).
``|x|`` clears the sign bit (``-0.0`` becomes ``+0.0``), so the k-th largest
magnitude is the k-th largest of 31-bit non-negative integers. Radix select
fixes those bits from the top: 11, then 11, then 9 bits. Each pass counts the
candidates' next digit with ``torch.bincount`` (exact integer counts, one
histogram row per tensor of the batch), walks the counts from the top to the
digit holding the k-th largest, and keeps only the candidates sharing the
prefix found so far. Three passes give all 31 bits: the exact bit pattern of
the k-th largest, hence exactly the value ``torch.kthvalue(|x|, n - k + 1)``
returns (a NaN for a NaN; NaNs order above ``inf``, as in ``kthvalue`` and
``topk``). No floating-point arithmetic is involved, so the result does not
depend on the device, the thread count or the batch it was computed in.

**Inputs.** float32, float16 and bfloat16 are accepted; the two 16-bit types are
promoted to float32 first (exact and order-preserving), as the merge engine
computes every delta in float32. Other dtypes are refused (rounding float64 to
float32 could create ties that are not there).

**Conventions** (those of :func:`merging.lora.sparsify.kth_largest`): ``k <= 0`` gives
``inf`` (keep none) and ``k >= numel`` gives ``0.0`` (keep all), also for an
empty tensor. :func:`keep_mask` is exactly the mask
:func:`merging.lora.sparsify.trim_block` applies for a threshold: ``|x| >= t``, NaN
entries kept (``hardshrink`` keeps them), nothing kept for ``t = inf``,
everything for ``t <= 0`` or ``t`` NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DIGITS = ((20, 11), (9, 11), (0, 9))
"""``(shift, width)`` of the radix passes, most significant first; they cover 31 bits."""
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of ``|values|`` (promoted to float32), same shape.

    Args:
        values: A float32/float16/bfloat16 tensor of any shape.

    Returns:
        A new int32 tensor of the same shape on the same device, ordered like ``|values|``.

    Raises:
        TypeError: ``values`` is not float32, float16 or bfloat16.
    """
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kselect takes float32, float16 or bfloat16 tensors, not {values.dtype}")
    return values.float().abs().contiguous().view(torch.int32)


def _as_ks(ks: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    if isinstance(ks, torch.Tensor):
        out = ks.to(device="cpu", dtype=torch.int64).reshape(-1)
    elif isinstance(ks, int):
        out = torch.full((batch,), ks, dtype=torch.int64)
    else:
        out = torch.tensor(list(ks), dtype=torch.int64).reshape(-1)
    if out.numel() == 1 and batch != 1:
        out = out.expand(batch)
    if out.numel() != batch:
        raise ValueError(f"{out.numel()} values of k for a batch of {batch} tensors")
    return out


def kth_largest_bits(bits: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Radix select on non-negative int32 rows: the ``ks[i]``-th largest of ``bits[i]``.

    Args:
        bits: ``(batch, n)`` int32, every entry >= 0 (from :func:`magnitude_bits`).
        ks: ``(batch,)`` int64 on ``bits``' device, ``1 <= ks[i] <= n``.

    Returns:
        ``(batch,)`` int32 on ``bits``' device.

    Raises:
        ValueError: ``bits`` is not 2-D int32.
    """
    if bits.dim() != 2 or bits.dtype != torch.int32:
        raise ValueError("kth_largest_bits takes a 2-D int32 tensor")
    batch = bits.shape[0]
    device = bits.device
    remaining = ks.to(device=device, dtype=torch.int64).clone()
    prefix = torch.zeros(batch, dtype=torch.int32, device=device)
    row_ids = torch.arange(batch, dtype=torch.int32, device=device)
    # First pass on the full rows (no per-entry row numbers needed: the row offset
    # broadcasts); later passes on the flat list of surviving candidates and their rows.
    cand, rows = bits, row_ids[:, None]
    for shift, width in DIGITS:
        bins = 1 << width
        high = cand >> shift  # the prefix fixed so far and this digit
        # The top digit is all of ``high`` (bit 31 is clear), so no mask is needed there.
        digit = high if shift + width >= 31 else high & (bins - 1)
        keys = digit if batch == 1 else digit + rows * bins
        counts = torch.bincount(keys.reshape(-1), minlength=batch * bins).view(batch, bins)
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # entries whose digit is >= d
        # The digit holding the k-th largest: the largest d with at_or_above[d] >= remaining.
        chosen = (at_or_above >= remaining[:, None]).sum(1) - 1
        above = at_or_above.gather(1, chosen[:, None]).squeeze(1) \
            - counts.gather(1, chosen[:, None]).squeeze(1)
        remaining -= above
        prefix |= chosen.to(torch.int32) << shift
        if shift:
            wanted = prefix >> shift
            if cand.dim() == 2:
                same = high == wanted[:, None]
                rows = row_ids[:, None].expand_as(cand)[same] if batch > 1 else row_ids[:0]
            else:
                same = high == (wanted[rows.long()] if batch > 1 else wanted)
                rows = rows[same] if batch > 1 else rows
            cand = cand[same]
    return prefix


def kth_largest_magnitudes(values: torch.Tensor,
                           ks: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The exact ``ks[i]``-th largest ``|x|`` of each ``values[i]`` (float32, no sorting).

    Args:
        values: ``(batch, ...)``; each ``values[i]`` is one tensor (flattened).
        ks: One ``k`` for all, or one per tensor of the batch.

    Returns:
        ``(batch,)`` float32 on ``values``' device: bit for bit
        ``torch.kthvalue(|values[i]|.flatten(), n - k + 1).values``; ``inf`` where
        ``k <= 0`` and ``0.0`` where ``k >= n`` (as :func:`merging.lora.sparsify.kth_largest`).

    Raises:
        TypeError: Unsupported dtype (see :func:`magnitude_bits`).
        ValueError: ``values`` has no batch dimension, or ``ks`` does not match it.
    """
    if values.dim() < 1:
        raise ValueError("kth_largest_magnitudes takes a batch: a tensor of at least 1 dimension")
    batch = values.shape[0]
    numel = math.prod(values.shape[1:])
    bits = magnitude_bits(values).reshape(batch, numel)
    k_cpu = _as_ks(ks, batch)
    out = torch.zeros(batch, dtype=torch.float32)
    out[k_cpu <= 0] = torch.inf
    todo = ((k_cpu > 0) & (k_cpu < numel)).nonzero().reshape(-1)
    result = out.to(values.device)
    if todo.numel() == 0:
        return result
    if todo.numel() == batch:
        picked = bits
    else:
        picked = bits[todo.to(values.device)]
    found = kth_largest_bits(picked, k_cpu[todo].to(values.device)).view(torch.float32)
    result[todo.to(values.device)] = found
    return result


def kth_largest_magnitude(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest ``|x|`` of one tensor: a 0-d float32 tensor on its device.

    See :func:`kth_largest_magnitudes` (``inf`` for ``k <= 0``, ``0.0`` for ``k >= numel``).

    Raises:
        TypeError: Unsupported dtype.
    """
    return kth_largest_magnitudes(values.reshape(1, -1), [k])[0]


def keep_mask(values: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """The entries a trim at ``thresholds`` keeps, exactly as :func:`merging.lora.sparsify.trim_block`.

    Args:
        values: ``(batch, ...)`` (or any shape with a scalar threshold).
        thresholds: A float, a 0-d tensor, or ``(batch,)`` float32 (one per tensor).

    Returns:
        A bool tensor shaped like ``values``: ``|x| >= t`` or ``x`` NaN; all False
        where ``t = inf``; all True where ``t <= 0`` or ``t`` is NaN.

    Raises:
        TypeError: Unsupported dtype.
    """
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=values.device)
    t = t.reshape(t.shape + (1,) * (values.dim() - t.dim()))
    bits = magnitude_bits(values)
    keep = bits >= t.contiguous().view(torch.int32)  # |x| >= t, and NaN (above every finite t)
    return (keep & (t != torch.inf)) | (t <= 0) | t.isnan()
