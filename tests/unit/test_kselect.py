"""kselect: radix-select k-th largest magnitude, bit for bit against torch and today's trim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.lora import kselect, sparsify
from merging.lora.kselect import (
    bracketed_kth_largest_bits,
    keep_mask,
    kth_largest_bits,
    kth_largest_magnitude,
    kth_largest_magnitudes,
    magnitude_bits,
    radix_kth_largest_bits,
    select_with_bracket,
)
from merging.lora.methods import ModuleContext, ModuleInput

SPECIALS = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.17549435e-38, 1.0, -1.0, 2.0, 3.4028235e38,
            -3.4028235e38, math.inf, -math.inf]


def bits_of(t: torch.Tensor) -> list[int]:
    return t.float().contiguous().view(torch.int32).reshape(-1).tolist()


def reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """torch.kthvalue's k-th largest |x| (float32), with kth_largest's conventions."""
    flat = values.float().abs().reshape(-1)
    if k <= 0:
        return torch.tensor(math.inf)
    if k >= flat.numel():
        return torch.tensor(0.0)
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, any NaN equal to any NaN (kthvalue's NaN payload is unspecified)."""
    if bool(a.isnan()) or bool(b.isnan()):
        return bool(a.isnan()) and bool(b.isnan())
    return bits_of(a) == bits_of(b)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65_537])
def test_random_float32_matches_kthvalue_and_topk(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for k in sorted({1, 2, n // 3, n // 2, n - 1, n}):
        if not 0 < k < n:
            continue
        got = kth_largest_magnitude(x, k)
        assert same_value(got, reference(x, k))
        assert bits_of(got) == bits_of(torch.topk(x.abs(), k).values[-1])


def test_batch_with_one_k_per_tensor() -> None:
    x = torch.randn(5, 40, 30, generator=torch.Generator().manual_seed(1))
    ks = [0, 1, 600, 1199, 1200]
    got = kth_largest_magnitudes(x, ks)
    assert got.shape == (5,) and got.dtype == torch.float32
    for i, k in enumerate(ks):
        assert same_value(got[i], reference(x[i], k))


def test_conventions_of_today_for_k_out_of_range_and_empty() -> None:
    x = torch.randn(10)
    assert float(kth_largest_magnitude(x, 0)) == math.inf
    assert float(kth_largest_magnitude(x, -3)) == math.inf
    assert float(kth_largest_magnitude(x, 10)) == 0.0
    assert float(kth_largest_magnitude(x, 11)) == 0.0
    empty = torch.empty(0)
    assert float(kth_largest_magnitude(empty, 0)) == math.inf
    assert float(kth_largest_magnitude(empty, 1)) == 0.0
    assert kth_largest_magnitudes(torch.empty(0, 3), 1).shape == (0,)


def test_ties_all_equal_and_signed_zeros() -> None:
    tied = torch.tensor([3.0, -3.0, 3.0, 1.0, -1.0, 3.0, 0.0, -0.0])
    for k in range(1, 8):
        assert same_value(kth_largest_magnitude(tied, k), reference(tied, k))
    same = torch.full((1000,), -0.25)
    assert float(kth_largest_magnitude(same, 500)) == 0.25
    zeros = torch.tensor([-0.0, 0.0, -0.0])
    assert bits_of(kth_largest_magnitude(zeros, 2)) == [0]  # +0.0, as |-0.0|


def test_denormals_inf_and_nan_order_as_kthvalue() -> None:
    x = torch.tensor(SPECIALS + [math.nan, -math.nan, 5.0])
    for k in range(1, x.numel()):
        assert same_value(kth_largest_magnitude(x, k), reference(x, k)), k
    # NaN is above inf: the two largest "magnitudes" are the NaNs.
    assert bool(kth_largest_magnitude(x, 2).isnan())
    assert float(kth_largest_magnitude(x, 3)) == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_promoted_exactly(dtype: torch.dtype) -> None:
    x = torch.randn(3, 999, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = kth_largest_magnitudes(x, [1, 400, 998])
    for i, k in enumerate([1, 400, 998]):
        assert same_value(got[i], reference(x[i].float(), k))
        assert float(got[i]) == float(torch.topk(x[i].abs(), k).values[-1])


def test_other_dtypes_are_refused() -> None:
    with pytest.raises(TypeError):
        kth_largest_magnitude(torch.randn(4, dtype=torch.float64), 1)
    with pytest.raises(TypeError):
        kth_largest_magnitude(torch.arange(4), 1)
    with pytest.raises(ValueError):
        kth_largest_magnitudes(torch.randn(3, 4), [1, 2])
    with pytest.raises(ValueError):
        kth_largest_bits(torch.zeros(4, dtype=torch.int32), torch.ones(1, dtype=torch.int64))


def test_adversarial_bit_patterns_share_long_prefixes() -> None:
    # Values whose bit patterns differ only in the last radix digit, or only in the first.
    base = np.float32(1.5).view(np.int32)
    low = torch.from_numpy((base + np.arange(512, dtype=np.int32)).view(np.float32))
    high = torch.from_numpy((np.arange(0, 2048, dtype=np.int32) << 20).view(np.float32))
    for x in (low, high, torch.cat([low, high, -low])):
        n = x.numel()
        for k in (1, 2, n // 2, n - 1):
            assert same_value(kth_largest_magnitude(x, k), reference(x, k))


def column_scaled(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A LoRA-like delta: a rank-4 product whose columns have very different scales,
    with a block of exact zeros and many ties (rounded entries)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=gen) @ torch.randn(4, cols, generator=gen)
    x *= torch.logspace(-3, 2, cols)[torch.randperm(cols, generator=gen)]
    x[: rows // 5] = 0.0
    x[rows // 2:] = x[rows // 2:].round()
    return x


def test_bracket_holds_on_large_structured_rows_and_is_exact() -> None:
    # rows above SAMPLE_SIZE entries: the bracket comes from a sample, not the row
    x = torch.stack([column_scaled(600, 700, seed=s) for s in range(3)])
    n = 600 * 700
    assert n > kselect.SAMPLE_SIZE
    for k in (1, 7, n // 10, n // 2, n - 5, n - 1):
        ks = torch.full((3,), k, dtype=torch.int64)
        found, held = bracketed_kth_largest_bits(magnitude_bits(x).reshape(3, n), ks)
        assert bool(held.all()), k
        for i in range(3):
            assert same_value(found[i].view(torch.float32), reference(x[i], k)), (i, k)


def test_a_misled_bracket_falls_back_to_radix_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kselect, "SAMPLE_SIZE", 256)
    monkeypatch.setattr(kselect, "SAMPLE_MARGIN", 64)  # 8 standard deviations
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(4))
    sampled = kselect.sample_positions(5000, 256, x.device)
    x[1, sampled] = 1e6  # row 1's sample sees only outliers: its bracket misses
    bits, ks = magnitude_bits(x), torch.tensor([2500, 2500])
    _, held = bracketed_kth_largest_bits(bits, ks)
    assert held.tolist() == [True, False]
    got = select_with_bracket(bits, ks)
    assert torch.equal(got, radix_kth_largest_bits(bits, ks))
    assert same_value(got[1].view(torch.float32), reference(x[1], 2500))


def test_a_threshold_inside_a_large_tie_is_settled_by_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    # a zero delta, and one 90% zeros at density 0.5: the k-th largest is 0, shared by most
    # of the row; none of that tie may go to the sort (on a GPU it would be the whole group)
    n = 400_000
    x = torch.zeros(3, n)
    x[1, : n // 10] = torch.randn(n // 10, generator=torch.Generator().manual_seed(7))
    x[2] = torch.randn(n, generator=torch.Generator().manual_seed(8)).round()  # ties at 0, 1, 2
    sorted_sizes: list[int] = []
    real_sort = torch.Tensor.sort

    def spy(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.dim() == 1:  # the candidates' sort (the sample's is 2-D)
            sorted_sizes.append(self.numel())
        return real_sort(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", spy)
    bits, ks = magnitude_bits(x), torch.tensor([n // 2, n // 2, n // 3])
    found, held = bracketed_kth_largest_bits(bits, ks)
    assert held.tolist() == [True, True, True]
    assert sorted_sizes == [0]  # every answer was an end of its bracket: nothing to sort
    for i in range(3):
        assert same_value(found[i].view(torch.float32), reference(x[i], int(ks[i])))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3000), st.integers(1, 40), st.integers(0, 8), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "ties", "scaled"]))
def test_bracketed_selection_equals_radix_whatever_the_sample(
        n: int, size: int, margin: int, seed: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, generator=gen)
    if kind == "ties":
        x = x.mul(2).round()
    elif kind == "scaled":
        x *= torch.logspace(-4, 4, n)
    ks = torch.randint(1, n + 1, (3,), generator=gen)
    bits = magnitude_bits(x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kselect, "SAMPLE_SIZE", size)
        patch.setattr(kselect, "SAMPLE_MARGIN", margin)
        found, held = bracketed_kth_largest_bits(bits, ks)
        got = select_with_bracket(bits, ks)
    expected = radix_kth_largest_bits(bits, ks)
    assert torch.equal(got, expected)
    assert torch.equal(found[held], expected[held])
    for i in range(3):  # k = n included: the smallest magnitude
        expected_value = torch.kthvalue(x[i].abs(), n - int(ks[i]) + 1).values
        assert same_value(got[i].view(torch.float32), expected_value)


def module_input(rows: int, cols: int, rank: int, seed: int, *, ties: bool = False) -> ModuleInput:
    gen = torch.Generator().manual_seed(seed)
    if ties:  # small integer factors: many exactly equal delta entries
        b = torch.randint(-2, 3, (rows, rank), generator=gen).float()
        a = torch.randint(-2, 3, (rank, cols), generator=gen).float()
    else:
        b, a = torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen)
    return ModuleInput(index=0, B=b, A=a, weight=1.0)


@pytest.mark.parametrize(("rows", "cols", "ties"), [(70, 50, False), (70, 50, True),
                                                    (1100, 1000, False), (1100, 1000, True)])
def test_equals_todays_threshold_and_trim(rows: int, cols: int, ties: bool) -> None:
    # 1100x1000 is above sparsify.SMALL_TENSOR: today's sampled-bracket path.
    inp = module_input(rows, cols, 4, rows + cols, ties=ties)
    ctx = ModuleContext(name="layers.0.q_proj", shape=(rows, cols), seed=0)
    delta = inp.B @ inp.A
    for density in (0.001, 0.2, 0.5, 0.9, 1.0):
        today = sparsify.magnitude_threshold(inp, density, ctx)
        k = sparsify.keep_count(density, rows * cols) if density < 1 else rows * cols
        ours = kth_largest_magnitude(delta, k)
        assert float(ours) == today
        trimmed = sparsify.trim_block(delta.clone(), today)
        masked = torch.where(keep_mask(delta, ours), delta, 0.0)
        assert bits_of(masked) == bits_of(trimmed)


def test_keep_mask_matches_trim_block_on_special_thresholds() -> None:
    x = torch.tensor(SPECIALS + [math.nan, 0.5, -7.0])
    for t in SPECIALS + [math.nan, 0.5, 7.0, -2.0]:
        expected = sparsify.trim_block(x.clone(), t)
        got = torch.where(keep_mask(x, t), x, 0.0)
        assert bits_of(got) == bits_of(expected), t


def test_keep_mask_takes_one_threshold_per_tensor() -> None:
    x = torch.randn(3, 20, 10, generator=torch.Generator().manual_seed(3))
    t = kth_largest_magnitudes(x, [5, 100, 200])
    mask = keep_mask(x, t)
    assert mask.shape == x.shape
    assert mask.reshape(3, -1).sum(1).tolist() == [5, 100, 200]


def test_magnitude_bits_order_like_values() -> None:
    x = torch.tensor(SPECIALS)
    bits = magnitude_bits(x)
    order = torch.argsort(x.abs(), stable=True)
    assert torch.equal(torch.argsort(bits, stable=True), order)
    assert bool((bits >= 0).all())


VALUES = st.sampled_from(SPECIALS + [0.5, -0.5, 0.25, 1e-30, 7.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(VALUES, st.floats(width=32, allow_nan=True)), min_size=1, max_size=300),
       st.integers(min_value=-2, max_value=310))
def test_hypothesis_matches_kthvalue_and_trim(values: list[float], k: int) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    got = kth_largest_magnitude(x, k)
    assert same_value(got, reference(x, k))
    if not bool(got.isnan()):
        expected = sparsify.trim_block(x.clone(), float(got))
        assert bits_of(torch.where(keep_mask(x, got), x, 0.0)) == bits_of(expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, 2.5, 1e-40]), min_size=12,
                         max_size=12), min_size=1, max_size=6),
       st.data())
def test_hypothesis_batched_equals_one_by_one(rows: list[list[float]], data: st.DataObject) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    ks = data.draw(st.lists(st.integers(min_value=0, max_value=12), min_size=len(rows),
                            max_size=len(rows)))
    got = kth_largest_magnitudes(x, ks)
    for i, k in enumerate(ks):
        assert same_value(got[i], kth_largest_magnitude(x[i], k))
        assert same_value(got[i], reference(x[i], k))
