"""lowrank: the device-agnostic, batched randomized SVD equals lowrank_refactor on the CPU."""

from __future__ import annotations

import hashlib

import pytest
import torch

from merging.lora import factorize as refactor
from merging.threads import intraop_threads
from merging.lora.lowrank import (
    frobenius_errors,
    lowrank_factors,
    exact_svd_wanted,
    randomized_svd,
    sketch_seed,
    sketch_width,
)


def low_rank_plus_noise(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, 24, generator=gen) @ torch.randn(24, cols, generator=gen)
    return signal + 0.01 * torch.randn(rows, cols, generator=gen)


def reference_lowrank_refactor(D: torch.Tensor, rank: int, *, seed: int,
                               module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The implementation factorize.lowrank_refactor had before it called lowrank_factors
    (torch.svd_lowrank under fork_rng): the CPU digests of stored merges come from it."""
    rows, cols = D.shape
    rank = max(1, min(rank, rows, cols))
    q = min(2 * rank, rows, cols)
    if not bool(torch.any(D)):
        return torch.zeros((rows, rank)), torch.zeros((rank, cols))
    if min(rows, cols) <= 2 * q or rows * cols <= (1 << 20):
        u, s, vh = torch.linalg.svd(D, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sketch_seed(seed, module))
            u, s, v = torch.svd_lowrank(D, q=q, niter=2)
        vh = v.T
    root = s[:rank].clamp(min=0).sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def test_sketch_seed_is_sha256_of_seed_module_svd() -> None:
    for seed, module in [(0, ""), (7, "layers.3.mlp.up_proj")]:
        digest = hashlib.sha256(f"{seed}\x1f{module}\x1fsvd".encode()).digest()
        assert sketch_seed(seed, module) == int.from_bytes(digest[:8], "little") >> 1


@pytest.mark.parametrize("shape", [(1100, 1000), (600, 1800), (40, 30), (300, 20)])
def test_one_matrix_is_the_old_lowrank_refactor(shape: tuple[int, int]) -> None:
    # (1100, 1000) and (600, 1800) take the randomized path (tall and wide), the others the
    # exact SVD. The old implementation ran on the caller's threads; run on one thread, its
    # exact SVDs are ours bit for bit, and its randomized SVD ours to float32 rounding (we
    # multiply by single-threaded row blocks, so the inner products may round differently).
    D = low_rank_plus_noise(*shape, seed=shape[0])
    randomized = shape[0] * shape[1] > (1 << 20)
    for rank in (4, 8):
        B, A = lowrank_factors(D, rank, seed=3, modules="m.q_proj")
        with intraop_threads(1):
            B_ref, A_ref = reference_lowrank_refactor(D, rank, seed=3, module="m.q_proj")
        if randomized:
            scale = float((B_ref @ A_ref).abs().max())
            assert float((B @ A - B_ref @ A_ref).abs().max()) <= 1e-5 * scale
        else:
            assert torch.equal(B, B_ref) and torch.equal(A, A_ref)
        B_now, A_now = refactor.lowrank_refactor(D, rank, seed=3, module="m.q_proj")
        assert torch.equal(B_now, B) and torch.equal(A_now, A)


@pytest.mark.parametrize("shape", [(1100, 1000), (600, 1800), (300, 200)])
def test_one_matrix_does_not_depend_on_the_thread_count(shape: tuple[int, int]) -> None:
    # MKL's QR and SVD give other last bits on 1 and 2 threads (576x1536 SVD, 11008x32 QR):
    # the CPU path runs them single-threaded and its products by single-threaded row blocks
    D = low_rank_plus_noise(*shape, seed=shape[1])
    results = []
    for threads in (1, 2, 3):
        with intraop_threads(threads):
            results.append(lowrank_factors(D, 8, seed=1, modules="m.v_proj"))
    for B, A in results[1:]:
        assert torch.equal(B, results[0][0]) and torch.equal(A, results[0][1])


def test_global_rng_untouched_and_repeatable() -> None:
    D = low_rank_plus_noise(1100, 1000, seed=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = lowrank_factors(D, 8, seed=5, modules="x")
    assert torch.equal(torch.random.get_rng_state(), before)
    second = lowrank_factors(D, 8, seed=5, modules="x")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = lowrank_factors(D, 8, seed=6, modules="x")
    assert not torch.equal(first[0], other[0])


def test_batch_matches_one_by_one_and_ignores_its_neighbours() -> None:
    stack = torch.stack([low_rank_plus_noise(1100, 1000, seed=s) for s in (1, 2, 3)])
    names = ["a", "b", "c"]
    B, A = lowrank_factors(stack, 8, seed=0, modules=names)
    assert B.shape == (3, 1100, 8) and A.shape == (3, 8, 1000)
    for i, name in enumerate(names):
        b1, a1 = lowrank_factors(stack[i], 8, seed=0, modules=name)
        # Same sketch, different kernels (CholeskyQR2 vs Householder): rounding only, though
        # amplified here since sigma_8 / sigma_9 is about 1.002 (a barely separated subspace).
        one = b1 @ a1
        assert float((B[i] @ A[i] - one).norm() / one.norm()) <= 5e-5
    # The same matrix and name gives the same factors whatever shares the batch.
    B2, A2 = lowrank_factors(stack[[0, 2]], 8, seed=0, modules=["a", "c"])
    B3, A3 = lowrank_factors(stack[[0, 2]], 8, seed=0, modules=["a", "c"])
    assert torch.equal(B2, B3) and torch.equal(A2, A3)
    torch.testing.assert_close(B2[1] @ A2[1], B[2] @ A[2], rtol=1e-4, atol=1e-4)


def test_error_is_near_the_exact_truncation() -> None:
    D = low_rank_plus_noise(1100, 1000, seed=4)
    B, A = lowrank_factors(D[None], 16, modules=["m"])
    err, norm = frobenius_errors(D[None], B, A)
    s = torch.linalg.svdvals(D.double())
    optimal = float((s[16:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert float(err[0] / norm[0]) <= optimal * 1.01


def test_zero_matrices_give_zero_factors() -> None:
    stack = torch.stack([torch.zeros(1100, 1000), low_rank_plus_noise(1100, 1000, seed=5)])
    B, A = lowrank_factors(stack, 4, modules=["z", "n"])
    assert not B[0].any() and not A[0].any() and B[1].any()
    B_ref, A_ref = refactor.lowrank_refactor(torch.zeros(50, 40), 4)
    B1, A1 = lowrank_factors(torch.zeros(50, 40), 4)
    assert torch.equal(B1, B_ref) and torch.equal(A1, A_ref)


def test_frobenius_errors_match_dense_error() -> None:
    D = low_rank_plus_noise(200, 150, seed=6)
    B, A = lowrank_factors(D, 5)
    err, norm = frobenius_errors(D, B, A)
    ref_err, ref_norm = refactor.dense_error(D, B, A)
    assert float(err) == pytest.approx(ref_err, rel=1e-5)
    assert float(norm) == pytest.approx(ref_norm, rel=1e-6)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        lowrank_factors(torch.zeros(2, 3, 4), 2, modules="one name for two matrices")
    with pytest.raises(ValueError):
        lowrank_factors(torch.zeros(3), 1)
    with pytest.raises(ValueError):
        randomized_svd(torch.zeros(2, 30, 20), 4, seeds=[1])


def test_exact_svd_rule_by_shape_and_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # any device but the CPU
    assert exact_svd_wanted(64, 4096, 32, gpu) and exact_svd_wanted(64, 4096, 32, cpu)
    assert exact_svd_wanted(576, 576, 32, cpu) and not exact_svd_wanted(576, 576, 32, gpu)
    assert not exact_svd_wanted(1100, 1000, 16, cpu)  # above SMALL_MATRIX entries


def test_sketch_width_keeps_the_cpu_rule_and_oversamples_more_elsewhere() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("meta")
    assert sketch_width(2, 300, 200, cpu) == 4 and sketch_width(16, 4096, 4096, cpu) == 32
    assert sketch_width(2, 300, 200, gpu) == 12 and sketch_width(16, 4096, 4096, gpu) == 32
    assert sketch_width(8, 300, 12, gpu) == 12 and sketch_width(3, 50, 40, gpu, oversample=1) == 4


def test_the_device_sketch_of_small_low_rank_modules_matches_the_exact_svd() -> None:
    # what a GPU does for a 300x200 module at rank 2 (the CPU takes an exact SVD there):
    # found by a QA pass, 2*rank columns came out up to 4.4% worse than the exact truncation
    rows, cols, rank = 300, 200, 2
    gen = torch.Generator().manual_seed(0)
    D = torch.stack([torch.randn(rows, 8, generator=gen) @ torch.randn(8, cols, generator=gen)
                     for _ in range(32)])
    names = [f"layers.{i}.q_proj" for i in range(32)]
    q = sketch_width(rank, rows, cols, torch.device("meta"))
    assert not exact_svd_wanted(rows, cols, q, torch.device("meta"))
    U, S, V = randomized_svd(D, q, [sketch_seed(0, n) for n in names])  # the batched device steps
    root = S[:, :rank].sqrt()
    sketched, _ = frobenius_errors(D, U[..., :rank] * root[:, None, :], root[:, :, None] * V[..., :rank].mT)
    s = torch.linalg.svdvals(D.double())
    exact = (s[:, rank:] ** 2).sum(1).sqrt()
    assert float((sketched / exact).max()) <= 1.01
