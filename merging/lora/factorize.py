"""Turn a merged delta back into LoRA factors, and measure what that costs.

Three ways, chosen by the engine from the method's output kind and ``--rank``:

**Exact re-factorization of stacked factors** (:func:`exact_refactor`; linear,
task_arithmetic, and cat with ``--rank N``). For ``D = B @ A`` with ``B`` of shape
``(out, R)`` and ``A`` of shape ``(R, in)`` (R = sum of input ranks), take
``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR, float64), SVD the small core
``R_b R_a^T = U S V^T`` (R x R) and return ``B' = Q_b U_k S_k^½``,
``A' = S_k^½ V_k^T Q_a^T``. With ``k`` = the number of singular values above
``S_max · 2^-23`` this is exactly ``D`` (up to float32 rounding) at its true rank,
e.g. an adapter merged with itself keeps rank r, not 2r. With ``k = N < true
rank`` it is the optimal rank-N truncation (Eckart-Young) of ``D`` without ever
forming ``D``. Cost: two thin QRs and an R x R SVD (milliseconds).

**Truncated randomized SVD of a dense delta** (:func:`lowrank_refactor`; TIES, DARE,
magnitude_prune). ``torch.svd_lowrank``'s algorithm with ``q = 2·rank``
(oversampling equal to the rank) and ``niter = 2`` power iterations; on TIES
deltas of two rank-16 Llama-2-7B-shaped adapters the rank-16 error is within 1% of
the exact truncated SVD's (``benchmarks/bench_merge.py`` prints the ratio). The
sketch's random matrix is drawn from a generator seeded from
``sha256(seed, module, "svd")`` (its own generator on the delta's device:
:mod:`merging.lora.lowrank`, the one implementation, also batched), so the output is
reproducible per device and the caller's global RNG is untouched. Small matrices (``min(out, in) <= 2q``, or on the CPU
under 2^20 entries: :func:`merging.lora.lowrank.exact_svd_wanted`) use the exact
``torch.linalg.svd`` instead.

**Full rank** (:func:`full_factors`; ``--rank full``): ``D = I @ D`` (or ``D @ I``),
rank ``min(out, in)``: exact, large, for checks.

Factors are balanced (``S^½`` on each side) so that storing them in float16 or
bfloat16 does not push one side out of range. Errors are relative Frobenius norms
``||D - B'A'||_F / ||D||_F`` measured on the factors *as stored* (after the cast
to the output dtype): :func:`dense_error` block by block for dense deltas,
:func:`factored_error` through R x R Gram matrices in float64 for factored ones.
"""

from __future__ import annotations

import math

import torch

from merging.lora.lowrank import NITER, lowrank_factors
from merging.threads import intraop_threads

RANK_RTOL = 2.0 ** -23
"""Singular values below ``RANK_RTOL · S_max`` are float32 noise and are dropped."""


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp(min=0).sqrt()
    return (u * root).float(), (root[:, None] * vh).float()


def _zero_factors(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((rows, 1), device=device), torch.zeros((1, cols), device=device)


def exact_refactor(B: torch.Tensor, A: torch.Tensor,
                   rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``B @ A`` exactly (``rank=None``: true rank) or truncate it optimally.

    Args:
        B: ``(out, R)`` factor.
        A: ``(R, in)`` factor.
        rank: Keep at most this many singular values (None: all above the noise).

    Returns:
        ``(B', A')`` float32 with ``k >= 1`` columns/rows (a zero delta gives one zero
        column).
    """
    rows, cols = B.shape[0], A.shape[1]
    with intraop_threads(1):  # LAPACK's bits depend on the thread count (merging.threads)
        qb, rb = torch.linalg.qr(B.double())
        qa, ra = torch.linalg.qr(A.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return _zero_factors(rows, cols, B.device)
    keep = int(torch.count_nonzero(s > s[0] * RANK_RTOL))
    if rank is not None:
        keep = min(keep, rank)
    keep = max(keep, 1)
    # Q from torch.linalg.qr is column-major: (U^T Q^T)^T is ~8x faster than Q @ U
    with intraop_threads(1):
        return _balanced((u[:, :keep].T @ qb.T).T, s[:keep], vh[:keep] @ qa.T)


def lowrank_refactor(D: torch.Tensor, rank: int, *, seed: int = 0, module: str = "",
                     oversample: int | None = None,
                     niter: int = NITER) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of a dense delta, by truncated randomized SVD.

    The one implementation is :func:`merging.lora.lowrank.lowrank_factors` (any
    device; its own seeded generator per matrix, so no global RNG is touched).

    Args:
        D: ``(out, in)`` float32 delta, on any device.
        rank: Output rank (clamped to ``min(out, in)``).
        seed: Run seed; with ``module`` it seeds the sketch.
        module: Module name (part of the sketch seed).
        oversample: Extra sketch columns (default: ``rank``, i.e. ``q = 2·rank``).
        niter: Power iterations.

    Returns:
        ``(B, A)`` float32 on ``D``'s device, ``B`` ``(out, rank)``, ``A`` ``(rank, in)``.
    """
    return lowrank_factors(D, rank, seed=seed, modules=module, oversample=oversample,
                           niter=niter)


def full_factors(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``D`` itself as factors of rank ``min(out, in)``: ``(I, D)`` or ``(D, I)``."""
    rows, cols = D.shape
    if rows <= cols:
        return torch.eye(rows, device=D.device), D.clone()
    return D.clone(), torch.eye(cols, device=D.device)


def dense_error(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> tuple[float, float]:
    """``(||D - B A||_F, ||D||_F)``, block by block (float64 accumulation)."""
    from merging.lora.sparsify import row_blocks
    from merging.threads import block_map

    B32, A32 = B.float(), A.float()

    def part(_j: int, rows: slice) -> tuple[float, float]:
        d = D[rows]
        diff = torch.addmm(d, B32[rows], A32, alpha=-1.0)
        return (float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2,
                float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2)

    parts = block_map(part, row_blocks(D.shape[0]))
    return math.sqrt(sum(p[0] for p in parts)), math.sqrt(sum(p[1] for p in parts))


def factored_error(B_ref: torch.Tensor, A_ref: torch.Tensor, B: torch.Tensor,
                   A: torch.Tensor) -> tuple[float, float]:
    """``(||B_ref A_ref - B A||_F, ||B_ref A_ref||_F)`` without forming either product.

    ``||X Y||_F² = Σ (X^T X) ∘ (Y Y^T)`` for ``X = [B_ref, -B]``, ``Y = [A_ref; A]``:
    two small Gram matrices, in float64 (resolves relative errors down to ~1e-8).
    The reference norm is the top-left block of the same Grams.
    """
    k = B_ref.shape[1]
    x = torch.cat([B_ref.double(), -B.double()], dim=1)
    y = torch.cat([A_ref.double(), A.double()], dim=0)
    with intraop_threads(1):  # reductions over ``out`` and ``in``: not thread-count dependent
        product = (x.T @ x) * (y @ y.T)
    err2 = float(product.sum())
    norm2 = float(product[:k, :k].sum())
    return math.sqrt(max(err2, 0.0)), math.sqrt(max(norm2, 0.0))
