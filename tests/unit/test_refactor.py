"""Re-factorization of merged deltas: exact QR path, randomized SVD, error measures."""

from __future__ import annotations

import pytest
import torch

from merging.lora import factorize as refactor
from merging.lora.methods import MergeParams, ModuleContext, ModuleInput
from merging.lora.methods.ties import ties


def factors(rows: int, cols: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen)


def rel(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.linalg.norm(D - B @ A) / torch.linalg.norm(D))


def test_exact_refactor_reproduces_the_product_at_true_rank() -> None:
    b1, a1 = factors(50, 70, 4, 1)
    b2, a2 = factors(50, 70, 6, 2)
    B, A = torch.cat([b1, b2, b1], dim=1), torch.cat([a1, a2, a1], dim=0)  # rank 10, not 14
    Bo, Ao = refactor.exact_refactor(B, A)
    assert Bo.shape == (50, 10) and Ao.shape == (10, 70)
    assert rel(B @ A, Bo, Ao) < 1e-6


def test_exact_refactor_truncation_is_the_optimal_one() -> None:
    B, A = factors(60, 40, 12, 3)
    D = B @ A
    Bo, Ao = refactor.exact_refactor(B, A, rank=5)
    s = torch.linalg.svdvals(D.double())
    optimal = float((s[5:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert rel(D, Bo, Ao) == pytest.approx(optimal, rel=1e-4)


def test_exact_refactor_of_zero_is_one_zero_column() -> None:
    Bo, Ao = refactor.exact_refactor(torch.zeros(5, 3), torch.zeros(3, 4))
    assert Bo.shape == (5, 1) and Ao.shape == (1, 4) and not Bo.any() and not Ao.any()


def test_factored_error_matches_dense() -> None:
    B, A = factors(30, 20, 5, 4)
    Bo, Ao = refactor.exact_refactor(B, A, rank=3)
    err, norm = refactor.factored_error(B, A, Bo, Ao)
    D = (B @ A).double()
    assert norm == pytest.approx(float(torch.linalg.norm(D)), rel=1e-6)
    assert err == pytest.approx(float(torch.linalg.norm(D - (Bo @ Ao).double())), rel=1e-5)


def test_dense_error_matches_direct_computation() -> None:
    D = torch.randn(130, 70, generator=torch.Generator().manual_seed(5))
    B, A = refactor.lowrank_refactor(D, 8)
    err, norm = refactor.dense_error(D, B, A)
    assert err == pytest.approx(float(torch.linalg.norm(D - B @ A)), rel=1e-5)
    assert norm == pytest.approx(float(torch.linalg.norm(D)), rel=1e-6)


def test_full_factors_are_exact() -> None:
    for shape in [(7, 9), (9, 7)]:
        D = torch.randn(*shape)
        B, A = refactor.full_factors(D)
        assert B.shape[1] == min(shape) and torch.equal(B @ A, D)


def ties_delta(rows: int, cols: int, rank: int = 16) -> torch.Tensor:
    inputs = [ModuleInput(i, *factors(rows, cols, rank, 10 + i), weight=1.0) for i in range(2)]
    return ties(inputs, MergeParams(density=0.5), ModuleContext("m", (rows, cols), 0))


def test_randomized_svd_is_within_5_percent_of_exact_svd() -> None:
    """A TIES delta (slowly decaying spectrum) large enough for the randomized path."""
    D = ties_delta(700, 1600)
    assert D.numel() > (1 << 20) and min(D.shape) > 4 * 16  # not the exact-SVD fallback
    B, A = refactor.lowrank_refactor(D, 16, seed=3, module="m")
    u, s, vh = torch.linalg.svd(D, full_matrices=False)
    exact = rel(D, u[:, :16] * s[:16], vh[:16])
    ours = rel(D, B, A)
    assert ours <= 1.05 * exact
    assert ours >= exact * (1 - 1e-4)


def test_randomized_svd_is_reproducible_and_leaves_global_rng_alone() -> None:
    D = ties_delta(600, 1800, rank=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = refactor.lowrank_refactor(D, 8, seed=1, module="m")
    assert torch.equal(torch.get_rng_state(), state)
    second = refactor.lowrank_refactor(D, 8, seed=1, module="m")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_lowrank_rank_is_clamped_and_zero_handled() -> None:
    B, A = refactor.lowrank_refactor(torch.randn(5, 3), 16)
    assert B.shape == (5, 3) and A.shape == (3, 3)
    B, A = refactor.lowrank_refactor(torch.zeros(4, 6), 2)
    assert B.shape == (4, 2) and not B.any()
