"""Row-range merging (merging.model.rowmerge) against float64 references, both ways.

The float64 product ``W + s·B·A`` rounded once to the base dtype is the reference;
the float32 way rounds once too, and the bfloat16 way (split factors) may differ from
it only at rounding ties, by one bfloat16 ulp.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from merging.model import rowmerge
from merging.model.buffers import BufferPool, view_as
from merging.model.rowmerge import RowFactors, merge_rows, split_bf16


def _case(rows: int = 300, cols: int = 200, rank: int = 8, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    a = torch.randn(rank, cols, generator=gen) * 0.05
    b = torch.randn(rows, rank, generator=gen) * 0.05
    return weight, a, b, 1.7


def _exact(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return weight.double() + scale * (b.double() @ a.double())


def _within_rounding(merged: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, scale: float) -> bool:
    """Elementwise: no farther from the exact sum than its own bfloat16 rounding, plus
    the usual bound on a computed dot product, ~2^-16 of ``|W| + s·|B|·|A|`` (the
    split factors keep ~16 bits; this only matters where terms cancel)."""
    exact = _exact(weight, a, b, scale)
    best = (exact.to(torch.bfloat16).double() - exact).abs()
    slack = 2**-15 * (weight.double().abs() + scale * (b.double().abs() @ a.double().abs()))
    return bool(((merged.double() - exact).abs() <= best + slack).all())


def test_split_factors_reproduce_the_scaled_product() -> None:
    _, a, b, scale = _case()
    a3, b3 = split_bf16(a, b, scale)
    assert a3.dtype == b3.dtype == torch.bfloat16 and a3.shape[0] == b3.shape[1] == 3 * a.shape[0]
    exact = scale * (b.double() @ a.double())
    error = (b3.double() @ a3.double() - exact).norm() / exact.norm()
    plain = (b.to(torch.bfloat16).double() @ a.to(torch.bfloat16).double() * scale - exact).norm() \
        / exact.norm()
    assert error < 2**-14 and plain > 2**-10  # the split keeps ~16 bits, rounding keeps ~8


@pytest.mark.parametrize("bf16_way", [True, False])
def test_bf16_rows_match_the_rounded_float64_merge(monkeypatch: pytest.MonkeyPatch,
                                                   bf16_way: bool) -> None:
    monkeypatch.setattr(rowmerge, "BF16_GEMM", bf16_way)
    weight, a, b, scale = _case()
    factors = RowFactors.build(a, b, scale, False, "BF16")
    assert (factors.split is not None) is bf16_way
    exact = _exact(weight, a, b, scale)
    merged = torch.cat([merge_rows(weight[r0:r1].clone(), factors, r0, r1, keep_raw=False)[0]
                        for r0, r1 in ((0, 128), (128, 300))])
    reference = exact.to(torch.bfloat16)  # one rounding from the exact sum
    assert _within_rounding(merged, weight, a, b, scale)
    # ties: 2e-4 of the elements on 1B-model shapes, ~2e-3 here (a delta 0.6x the weight)
    assert float((merged != reference).float().mean()) <= 5e-3


def test_both_ways_agree_and_report_the_merged_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, a, b, scale = _case(seed=3)
    results = {}
    for way in (True, False):
        monkeypatch.setattr(rowmerge, "BF16_GEMM", way)
        factors = RowFactors.build(a, b, scale, False, "BF16")
        results[way] = merge_rows(weight.clone(), factors, 0, weight.shape[0], keep_raw=False)
    (fast, fast_norm), (slow, slow_norm) = results[True], results[False]
    assert float((fast != slow).float().mean()) <= 5e-3
    assert _within_rounding(fast, weight, a, b, scale) and _within_rounding(slow, weight, a, b, scale)
    exact_norm = float(_exact(weight, a, b, scale).norm())
    assert slow_norm == pytest.approx(exact_norm, rel=1e-3)
    assert fast_norm == pytest.approx(exact_norm, rel=2**-7)  # rounded to bfloat16


@pytest.mark.parametrize("bf16_way", [True, False])
def test_transposed_rows_and_keep_raw(monkeypatch: pytest.MonkeyPatch, bf16_way: bool) -> None:
    """An ``(in, out)`` weight merges to the transpose of the ``(out, in)`` merge, and
    ``keep_raw`` leaves the rows read untouched (written into the given buffer)."""
    monkeypatch.setattr(rowmerge, "BF16_GEMM", bf16_way)
    weight, a, b, scale = _case(rows=96, cols=80, seed=5)
    straight = RowFactors.build(a, b, scale, False, "BF16")
    expected, _ = merge_rows(weight.clone(), straight, 0, 96, keep_raw=False)
    turned = RowFactors.build(a, b, scale, True, "BF16")
    raw = weight.T.contiguous()[10:50]
    before = raw.clone()
    buffer = BufferPool(1, raw.numel() * 2).acquire(raw.numel() * 2)
    out, _ = merge_rows(raw, turned, 10, 50, keep_raw=True, out_buffer=buffer)
    assert torch.equal(raw, before)
    assert torch.equal(out, expected.T[10:50])
    if bf16_way:
        assert out.data_ptr() == buffer.data_ptr()


def test_float32_and_float16_rows_round_once() -> None:
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(64, 48, generator=gen).to(dtype)
        a, b = torch.randn(4, 48, generator=gen) * 0.1, torch.randn(64, 4, generator=gen) * 0.1
        factors = RowFactors.build(a, b, 0.5, False, "F32" if dtype == torch.float32 else "F16")
        assert factors.split is None
        out, norm = merge_rows(weight.clone(), factors, 0, 64, keep_raw=True)
        exact = _exact(weight, a, b, 0.5)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        assert float((out.double() - exact).abs().max()) <= tol * float(exact.abs().max())
        assert norm == pytest.approx(float(exact.norm()), rel=1e-4)


@pytest.mark.parametrize("dtype,bf16_way", [("F16", False), ("BF16", True), ("BF16", False)])
def test_overflow_gives_a_non_finite_norm(monkeypatch: pytest.MonkeyPatch, dtype: str,
                                          bf16_way: bool) -> None:
    monkeypatch.setattr(rowmerge, "BF16_GEMM", bf16_way)
    torch_dtype = torch.float16 if dtype == "F16" else torch.bfloat16

    def norm_of(value: float) -> float:  # every merged element is 1 + 2 * value**2
        factors = RowFactors.build(torch.full((2, 8), value), torch.full((8, 2), value), 1.0,
                                   False, dtype)
        return merge_rows(torch.ones(8, 8, dtype=torch_dtype), factors, 0, 8, keep_raw=False)[1]

    # float16 tops out at 65504, bfloat16 (and float32) at ~3.4e38
    too_big, big = (200.0, 100.0) if dtype == "F16" else (2e19, 1e19)
    assert not math.isfinite(norm_of(too_big))
    # elements that fit, with a norm that does not fit the dtype: not an overflow
    assert norm_of(big) == pytest.approx(8 * (1 + 2 * big**2), rel=1e-2)


def test_buffer_pool_reuses_blocks_and_is_backpressure() -> None:
    pool = BufferPool(2, 1024)
    first, second = pool.acquire(1024), pool.acquire(10)
    assert first is not None and second is not None and first.numel() == 1024
    assert pool.acquire(4096) is None  # larger than a buffer: the caller allocates
    pointer = first.data_ptr()
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(8)))  # type: ignore[arg-type]
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # both in use: waits
    pool.release(first)
    waiter.join(5)
    assert got and got[0].data_ptr() == pointer  # the same memory, not a new block
    view = view_as(got[0], torch.bfloat16, (3, 5))
    assert view.shape == (3, 5) and view.data_ptr() == pointer
    assert view_as(None, torch.float32, (2,)).shape == (2,)
    with pytest.raises(ValueError):
        BufferPool(0, 10)
