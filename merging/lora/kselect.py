"""Exact k-th largest magnitude without sorting the tensor: integer selection on float32 bits.

The TIES/magnitude-prune trim keeps the ``k`` entries of largest magnitude, i.e.
every entry with ``|x| >= t`` where ``t`` is the k-th largest ``|x|``
(:mod:`merging.lora.sparsify`; entries tied with ``t`` are all kept). ``torch.kthvalue``
finds ``t`` by a selection that is slow on large tensors and, on CUDA, sorts: on
45M entries it dominated a GPU TIES merge. This module finds the same ``t``
with integer counting only, on any device and for a batch of tensors at once, in
one of two ways (:func:`kth_largest_bits` picks by device; both exact):

* **radix select** (the CPU): histograms of the bit patterns' digits, below;
* **a sampled bracket** (other devices: a GPU's histogram adds collide, see
  :func:`kth_largest_bits`): the order statistics of a fixed sample of each row
  bracket the answer, comparison counts (reductions) prove the bracket holds it
  and settle an answer at either end (a tie, e.g. zeros), and one sort of the ~1.6%
  of entries strictly inside finds any other; a row whose bracket
  misses (an unlucky or adversarial sample) goes to radix select.

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
SAMPLE_SIZE = 1 << 18
"""Entries per row sampled to bracket the k-th largest."""
SAMPLE_MARGIN = 1 << 11
"""Sample ranks on each side of the wanted one that the bracket spans: 8 standard
deviations of a sample quantile's rank (at most ``sqrt(SAMPLE_SIZE) / 2 = 256``), so
for unstructured data a miss is practically impossible; about 1.6% of a row lies in it."""
SAMPLE_STEP = 2_654_435_761
"""The prime step of :func:`sample_positions` (Knuth's multiplicative hash constant)."""
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
    """The ``ks[i]``-th largest of each ``bits[i]`` (non-negative int32 rows), exactly.

    On the CPU by :func:`radix_kth_largest_bits` (``bincount`` there is a fast,
    uncontended loop); on another device by :func:`select_with_bracket`, since a GPU's
    ``bincount`` adds with global atomics, and most entries share the few top digits
    that the exponent spans: those adds queue on the same addresses (3.6 s of a
    4.8 s TIES merge at 7B shapes on an H200). Both are exact: the answer does not
    depend on which one ran. Arguments, result and errors are
    :func:`radix_kth_largest_bits`' (``ks`` may be on any device here).
    """
    if bits.dim() != 2 or bits.dtype != torch.int32:
        raise ValueError("kth_largest_bits takes a 2-D int32 tensor")
    ks = ks.to(device=bits.device, dtype=torch.int64)
    if bits.device.type == "cpu":
        return radix_kth_largest_bits(bits, ks)
    return select_with_bracket(bits, ks)


def select_with_bracket(bits: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """:func:`kth_largest_bits` by a sampled bracket, radix select for the rows it misses.

    Rows the bracket (:func:`bracketed_kth_largest_bits`) holds are done by
    comparisons and one small sort; the others (an unlucky or adversarial sample) by
    :func:`radix_kth_largest_bits`.

    Args:
        bits: ``(batch, n)`` int32, entries >= 0.
        ks: ``(batch,)`` int64 on ``bits``' device, ``1 <= ks[i] <= n``.

    Returns:
        ``(batch,)`` int32 on ``bits``' device.
    """
    found, held = bracketed_kth_largest_bits(bits, ks)
    missed = (~held).nonzero().reshape(-1)
    if missed.numel():  # the sample misled the bracket of these rows: count digits instead
        found[missed] = radix_kth_largest_bits(bits[missed], ks[missed])
    return found


def sample_positions(n: int, size: int, device: torch.device) -> torch.Tensor:
    """``size`` positions in ``range(n)`` spread over it: ``i · P mod n`` for a prime ``P``.

    A plain stride would read the same few columns of every row of a matrix whose
    column count it divides (LoRA deltas scale by column), and bias the sample; the
    prime step walks all columns and rows. Deterministic: no generator involved.
    """
    if n <= size:
        return torch.arange(n, device=device)
    return torch.arange(size, dtype=torch.int64, device=device).mul_(SAMPLE_STEP).remainder_(n)


def bracketed_kth_largest_bits(bits: torch.Tensor, ks: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ks[i]``-th largest of each row where a sampled bracket holds it.

    The sample's order statistics around the wanted rank give ``lo <= hi``. Four
    comparison counts (reductions: no atomics, exact) place the answer ``v``:

    * ``v = hi`` when ``#{x > hi} < k <= #{x >= hi}``, and ``v = lo`` when
      ``#{x > lo} < k <= #{x >= lo}``: a threshold inside a large tie (a zero delta,
      or one mostly zeros) is settled by counting, and none of the tie is sorted;
    * otherwise, when ``#{x >= hi} < k <= #{x > lo}``, ``v`` is the
      ``(k - #{x >= hi})``-th largest of the entries strictly between ``lo`` and
      ``hi`` (about 1.6% of a row), found by one sort of those entries, all rows at
      once, keyed by row;
    * otherwise the bracket missed (``held`` is False).

    A row no longer than the sample is its own sample: its sorted copy gives ``v``.

    Args:
        bits: ``(batch, n)`` int32, entries >= 0.
        ks: ``(batch,)`` int64 on ``bits``' device, ``1 <= ks[i] <= n``.

    Returns:
        ``(found, held)``: ``(batch,)`` int32 values, exact where ``held`` (bool) is
        True; elsewhere unspecified.
    """
    batch, n = bits.shape
    sample = bits[:, sample_positions(n, SAMPLE_SIZE, bits.device)]
    size = sample.shape[1]
    ordered = sample.sort(dim=1, descending=True).values
    if size == n:  # the whole row, sorted
        found = ordered.gather(1, (ks - 1).clamp(0, max(n - 1, 0))[:, None]).squeeze(1)
        return found, torch.ones(batch, dtype=torch.bool, device=bits.device)
    at = torch.div(ks * size, n, rounding_mode="floor")  # the wanted rank, in the sample
    top, bottom = at - SAMPLE_MARGIN, at + SAMPLE_MARGIN
    hi = torch.where(top < 0, torch.iinfo(torch.int32).max,
                     ordered.gather(1, top.clamp(0, size - 1)[:, None]).squeeze(1))
    lo = torch.where(bottom >= size, 0, ordered.gather(1, bottom.clamp(0, size - 1)[:, None]).squeeze(1))
    hi_col, lo_col = hi[:, None], lo[:, None]
    above_hi, from_hi = (bits > hi_col).sum(1), (bits >= hi_col).sum(1)
    above_lo, from_lo = (bits > lo_col).sum(1), (bits >= lo_col).sum(1)
    at_hi = (above_hi < ks) & (ks <= from_hi)
    at_lo = (above_lo < ks) & (ks <= from_lo)
    between = ~at_hi & ~at_lo & (from_hi < ks) & (ks <= above_lo)
    inside = (bits > lo_col) & (bits < hi_col) & between[:, None]
    rows, cols = inside.nonzero(as_tuple=True)
    # one ascending sort of (row, value) keys; row r's candidates are one run of it
    keys = ((rows << 31) | bits[rows, cols].to(torch.int64)).sort().values
    ends = inside.sum(1).cumsum(0)  # a reduction: a histogram of ``rows`` would collide
    if keys.numel():
        wanted = (ends - (ks - from_hi)).clamp(0, keys.numel() - 1)
        sorted_pick = (keys[wanted] & 0x7FFFFFFF).to(torch.int32)
    else:
        sorted_pick = torch.zeros_like(hi)
    found = torch.where(at_hi, hi, torch.where(at_lo, lo, sorted_pick))
    return found, at_hi | at_lo | between


def radix_kth_largest_bits(bits: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
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
