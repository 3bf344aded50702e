"""``W[rows] + s·B[rows]·A`` for one row range of a base weight: the arithmetic of
merge-and-unload, apart from the pipeline that streams it (:mod:`merging.model.pipeline`).

Two ways to compute it, with the same result up to ties at a rounding boundary:

* **float32** (any dtype): the rows are cast to float32, ``addmm`` adds the delta,
  the sum is cast back: one rounding, like ``(W.float() + s·B·A).to(dtype)``. PEFT's
  ``merge_and_unload`` rounds twice (the delta to the base dtype, then the sum).
* **bfloat16** (a bfloat16 base, where the CPU multiplies bfloat16 natively, see
  :func:`bf16_gemm_is_native`): one ``addmm`` on the bfloat16 rows with the factors
  split into high and low bfloat16 halves, ``[B_hi B_hi B_lo]·[A_hi; A_lo; A_hi]``
  (:func:`split_bf16`), accumulated in float32 and rounded once. The split keeps
  ~16 bits of each factor, so the sum before rounding is within ~2^-16 of
  ``|W| + s·|B|·|A|`` of the exact one and the result is the float32 merge except
  for elements that close to a rounding boundary (measured on 1B-model shapes: 2e-4
  of the elements, one bfloat16 step apart, same largest error against a float64
  merge; ~2e-3 when the delta is as large as the weight), at a quarter of the cost:
  the float32 casts were most of the merge's CPU time.

Either way the merged rows' Frobenius norm doubles as the NaN/Inf check.

:func:`merge_ranges` (fast path) and :func:`read_merge` (ordered path) are the worker
tasks of :mod:`merging.model.pipeline` around it: read rows, merge, write (or hand back).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch

from merging.dtypes import torch_dtype
from merging.model.buffers import allocate, byte_view, view_as
from merging.model.layout import SourceTensor, TensorReader, to_float32
from merging.model.shard_writer import ShardWriter

BF16_GEMM: bool | None = None
"""Take the bfloat16 way for bfloat16 bases; ``None``: when :func:`bf16_gemm_is_native`."""


@functools.cache
def bf16_gemm_is_native() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware here (AVX512-BF16 / AMX); without
    it a bfloat16 ``addmm`` is emulated and the float32 way is faster."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op that may move between versions
        return False


def use_bf16_gemm(dtype: str) -> bool:
    """Whether a base tensor of safetensors dtype ``dtype`` takes the bfloat16 way."""
    return dtype == "BF16" and (bf16_gemm_is_native() if BF16_GEMM is None else BF16_GEMM)


def split_bf16(a: torch.Tensor, b: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A3, B3)`` in bfloat16 with ``B3 @ A3 = s·B·A`` up to ~2^-16 relative:
    ``A3 = [A_hi; A_lo; A_hi]``, ``B3 = [s·B_hi, s·B_hi, s·B_lo]`` where ``X_hi`` is
    ``X`` rounded to bfloat16 and ``X_lo`` the remainder, rounded."""
    b = b * scale
    a_hi, b_hi = a.to(torch.bfloat16), b.to(torch.bfloat16)
    a_lo, b_lo = (a - a_hi.float()).to(torch.bfloat16), (b - b_hi.float()).to(torch.bfloat16)
    return torch.cat([a_hi, a_lo, a_hi], 0), torch.cat([b_hi, b_hi, b_lo], 1).contiguous()


def add_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
              transposed: bool, r0: int, r1: int) -> None:
    """``weight += scale * (B @ A)[r0:r1]`` in place (float32); ``transposed`` for
    ``(in, out)`` weights (Conv1D / embeddings), whose rows are columns of A."""
    if transposed:
        weight.addmm_(a[:, r0:r1].T, b.T, alpha=scale)
    else:
        weight.addmm_(b[r0:r1], a, alpha=scale)


@dataclass(frozen=True)
class RowFactors:
    """One module's delta, ready for row ranges.

    Attributes:
        a: ``lora_A`` (float32, ``(r, in)``).
        b: ``lora_B`` (float32, ``(out, r)``).
        scale: ``alpha / r`` (or the rsLoRA / pattern value).
        transposed: The base weight is ``(in, out)``.
        split: :func:`split_bf16` of the factors when the bfloat16 way is taken.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool
    split: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def build(cls, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool,
              dtype: str) -> RowFactors:
        """The factors for a base tensor of safetensors dtype ``dtype``."""
        split = split_bf16(a, b, scale) if use_bf16_gemm(dtype) else None
        return cls(a, b, scale, transposed, split)


def merge_rows(raw: torch.Tensor, factors: RowFactors, r0: int, r1: int, *, keep_raw: bool,
               out_buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Rows ``r0:r1`` of the merged weight in the base dtype, and their norm.

    Args:
        raw: Rows ``r0:r1`` of the base weight; merged in place unless ``keep_raw``.
        factors: The module's delta.
        r0: First row.
        r1: End row.
        keep_raw: ``raw`` must survive (its bytes are hashed afterwards).
        out_buffer: Where the bfloat16 way writes when ``keep_raw`` (a pool buffer).

    Returns:
        ``(merged rows, Frobenius norm)``; the norm is ``inf`` or ``nan`` when any
        merged value is not finite.
    """
    if factors.split is not None:
        a3, b3 = factors.split
        lhs, rhs = (a3[:, r0:r1].T, b3.T) if factors.transposed else (b3[r0:r1], a3)
        if keep_raw:
            out = torch.addmm(raw, lhs, rhs,
                              out=view_as(out_buffer, raw.dtype, tuple(raw.shape)))
        else:
            out = raw.addmm_(lhs, rhs)
        # accumulated in float32; the norm is rounded to bfloat16 (~0.4%: a report)
        norm = float(torch.linalg.vector_norm(out))
    else:
        merged = raw.clone() if keep_raw and raw.dtype == torch.float32 else to_float32(raw)
        add_delta(merged, factors.a, factors.b, factors.scale, factors.transposed, r0, r1)
        out = merged.to(raw.dtype)
        norm = float(torch.linalg.vector_norm(merged))
    if not math.isfinite(norm) or out.dtype == torch.float16:
        # what is written decides: float16 overflows where float32 does not, and a
        # norm can overflow where no element does
        norm = math.inf if not bool(torch.isfinite(out).all()) else float(out.double().norm())
    return out, norm


def read_merge(reader: TensorReader, src: SourceTensor, factors: RowFactors, r0: int, r1: int,
                keep_raw: bool, buffers: tuple[torch.Tensor | None, torch.Tensor | None]
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Worker task of the ordered path: (rows as read, merged rows, norm)."""
    raw = reader.read(src, r0, r1, buffers[0])
    out, norm = merge_rows(raw, factors, r0, r1, keep_raw=keep_raw, out_buffer=buffers[1])
    return raw, out, norm


def merge_ranges(reader: TensorReader, writer: ShardWriter, offset: int, src: SourceTensor,
                  factors: RowFactors, ranges: list[tuple[int, int]],
                  local: threading.local, buffer_bytes: int) -> tuple[int, float]:
    """Merge row ranges of one tensor and write each at its place (``offset`` is where
    the tensor's data starts), in this worker's own buffer of ``buffer_bytes`` (kept in
    ``local``: allocated once per worker, see :mod:`merging.model.buffers`). Returns (bytes,
    sum of the squared norms); the sum is ``inf``/``nan`` as soon as a range is not
    finite (nothing more is written)."""
    row_bytes = src.info.nbytes // max(src.shape[0], 1)
    # a range is at least one row, which may be longer than buffer_bytes
    buffer_bytes = max([buffer_bytes] + [(r1 - r0) * row_bytes for r0, r1 in ranges])
    buffer = getattr(local, "buffer", None)
    if buffer is None or buffer.numel() < buffer_bytes:
        buffer = local.buffer = allocate(buffer_bytes)
        local.view = byte_view(buffer)
    view: memoryview = local.view
    dtype, tail = torch_dtype(src.dtype), tuple(src.shape[1:])
    sq = 0.0
    for r0, r1 in ranges:
        # straight into the buffer and out of it again: no per-range tensor plumbing
        nbytes = (r1 - r0) * row_bytes
        reader.read_bytes_into(src, r0 * row_bytes, view[:nbytes])
        raw = buffer[:nbytes].view(dtype).view((r1 - r0, *tail))
        out, norm = merge_rows(raw, factors, r0, r1, keep_raw=False)
        if not math.isfinite(norm):
            return 0, norm
        sq += norm * norm
        if out.data_ptr() == raw.data_ptr():  # merged in place (bfloat16 way, float32 base)
            writer.write_bytes_at(offset + r0 * row_bytes, view[:nbytes])
        else:
            writer.write_at(offset + r0 * row_bytes, out)
    return (ranges[-1][1] - ranges[0][0]) * row_bytes, sq
