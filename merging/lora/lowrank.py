"""Truncated randomized SVD of dense deltas on any device, one matrix or a batch.

:func:`merging.lora.factorize.lowrank_refactor` runs ``torch.svd_lowrank`` under
``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed``: correct on the
CPU, but on CUDA its sketch comes from the *global* CUDA generator (re-seeded by
``manual_seed`` and not restored, since only CPU state is forked), it allocates its
zero result on the CPU, and it takes one matrix at a time, which leaves a GPU idle
between the small QR/SVD steps.

This module is the same algorithm (Halko et al. 2009, Algorithm 5.1 with 4.4, as
``torch._lowrank._svd_lowrank``: sketch ``A R``, ``niter`` power iterations with a
QR after every product, SVD of the small ``Q^T A``) with three changes:

* the Gaussian sketch of matrix ``i`` is drawn from its own ``torch.Generator`` on
  the matrix's device, seeded from ``sha256(seed, module_i, "svd")``
  (:func:`sketch_seed`, the seed ``lowrank_refactor`` uses), so no global RNG is
  touched, results are reproducible per device and independent of which other
  modules share the batch (the draws are per matrix; the products are batched);
* a ``(batch, out, in)`` stack runs as batched matmuls, QRs and SVDs;
* every tensor is created on the input's device.

For one 2-D matrix on the CPU (the per-module merge) every step is single-threaded,
so the factors do not depend on the thread count (:mod:`merging.threads`): the
products run as :func:`merging.threads.row_product` (row blocks of ``A``, or of
``A^T`` for the transposed products, side by side) and the QRs and the small SVD with
one thread. A batch, and any matrix on another device (the GPU's path), uses batched
kernels only: the bases come from CholeskyQR2 (:mod:`merging.lora.cholqr`) instead of a
Householder QR per matrix, and the small SVD at the end is that of a ``q x q`` matrix,
on the CPU in float64. It rounds differently from one-by-one, still deterministically
on one device.
The selection rules are ``lowrank_refactor``'s: ``q = rank + oversample``
(default ``2·rank``; off the CPU at least ``rank + 10``: :func:`sketch_width`), an exact ``torch.linalg.svd`` for small matrices
(``min(out, in) <= 2q``, or on the CPU at most 2^20 entries: :func:`exact_svd_wanted`),
zero factors for a zero delta, and balanced factors (``S^½`` on each side).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import torch

from merging.lora.cholqr import orthonormal_columns
from merging.threads import intraop_threads, row_product

NITER = 2
"""Power iterations (as :data:`merging.lora.factorize.NITER`)."""
MIN_OVERSAMPLE = 10
"""Least extra sketch columns off the CPU (Halko et al. suggest 5 to 10)."""
SMALL_MATRIX = 1 << 20
"""At most this many entries: exact SVD (as ``lowrank_refactor``)."""


def sketch_seed(seed: int, module: str) -> int:
    """The sketch seed of ``module`` in a run seeded ``seed`` (``sha256(seed, module, "svd")``)."""
    text = f"{seed}\x1f{module}\x1fsvd"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _sketch(cols: int, q: int, seeds: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(len(seeds), cols, q)`` Gaussians, matrix ``i`` drawn from a generator seeded ``seeds[i]``."""
    draws = []
    for value in seeds:
        gen = torch.Generator(device=like.device).manual_seed(value)
        draws.append(torch.randn(cols, q, generator=gen, dtype=like.dtype, device=like.device))
    return torch.stack(draws)


def randomized_svd(D: torch.Tensor, q: int, seeds: Sequence[int],
                   niter: int = NITER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(D, q, niter)`` with one seeded sketch per matrix, batched.

    Args:
        D: ``(batch, m, n)`` float tensor on any device.
        q: Sketch width (``<= min(m, n)``).
        seeds: One generator seed per matrix.
        niter: Power iterations.

    Returns:
        ``(U, S, V)``: ``(batch, m, q)``, ``(batch, q)``, ``(batch, n, q)``, with
        ``D ≈ U diag(S) V^T``.

    Raises:
        ValueError: ``D`` is not 3-D or ``seeds`` does not have one seed per matrix.
    """
    if D.dim() != 3 or len(seeds) != D.shape[0]:
        raise ValueError("randomized_svd takes a (batch, m, n) tensor and one seed per matrix")
    wide = D.shape[-2] < D.shape[-1]
    A = D.mH if wide else D  # the algorithm assumes a tall matrix
    sketch = _sketch(A.shape[-1], q, seeds, A)
    if D.shape[0] == 1 and D.device.type == "cpu":
        U, S, V = _cpu_randomized_svd(A[0], sketch[0], niter)
        U, S, V = U[None], S[None], V[None]
    else:
        U, S, V = _batched_randomized_svd(A, sketch, niter)
    if wide:
        U, V = V, U
    return U, S, V


def _cpu_randomized_svd(A: torch.Tensor, sketch: torch.Tensor,
                        niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`randomized_svd`'s steps on one tall CPU matrix, none of them multi-threaded."""
    def orthonormal(Y: torch.Tensor) -> torch.Tensor:
        with intraop_threads(1):
            return torch.linalg.qr(Y).Q

    Q = orthonormal(row_product(A, sketch))
    for _ in range(niter):
        Q = orthonormal(row_product(A.mH, Q))
        Q = orthonormal(row_product(A, Q))
    with intraop_threads(1):
        # (A^T Q)^T = Q^T A: the small matrix whose SVD gives the factors
        U, S, Vh = torch.linalg.svd(row_product(A.mH, Q).mH, full_matrices=False)
        return Q @ U, S, Vh.mH


def _batched_randomized_svd(A: torch.Tensor, sketch: torch.Tensor,
                            niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`randomized_svd`'s steps on a tall batch with batched kernels only.

    The bases come from :func:`merging.lora.cholqr.orthonormal_columns` (no per-matrix
    QR); the SVD of the small ``C = Q^T A`` is that of the ``q x q`` ``R`` in
    ``C^T = P R`` (``P`` orthonormal): ``R = U_r S V_r^T`` gives
    ``A ~ Q C = (Q V_r) S (P U_r)^T``. That ``q x q`` SVD runs on the CPU in float64
    (LAPACK, a few kilobytes moved), where a GPU would loop over the batch.
    """
    Q = orthonormal_columns(A @ sketch)
    for _ in range(niter):
        Q = orthonormal_columns(A.mH @ Q)
        Q = orthonormal_columns(A @ Q)
    C_t = A.mH @ Q  # (Q^T A)^T: (batch, n, q)
    P = orthonormal_columns(C_t)
    R = P.mH @ C_t
    Ur, S, Vrh = torch.linalg.svd(R.to("cpu", torch.float64), full_matrices=False)
    Ur, S, Vr = (t.to(device=A.device, dtype=A.dtype) for t in (Ur, S, Vrh.mH))
    return Q @ Vr, S, P @ Ur


def sketch_width(rank: int, rows: int, cols: int, device: torch.device,
                 oversample: int | None = None) -> int:
    """``q``, the sketch's columns: ``rank + oversample``, at most ``min(rows, cols)``.

    The default oversample is ``rank`` (``lowrank_refactor``'s ``q = 2·rank``, kept on the
    CPU so stored merges rebuild bit for bit), and off the CPU at least
    :data:`MIN_OVERSAMPLE`. Off the CPU a small module is sketched where the CPU takes an
    exact SVD (:func:`exact_svd_wanted`), and at a low rank ``2·rank`` columns are too few
    to match it: rank 2 of rank-8 deltas came out 4.4% worse with ``q = 4``, 0.0% with
    ``q = 12`` (a QA pass).
    """
    extra = oversample if oversample is not None else (
        rank if device.type == "cpu" else max(rank, MIN_OVERSAMPLE))
    return min(rank + extra, rows, cols)


def exact_svd_wanted(rows: int, cols: int, q: int, device: torch.device) -> bool:
    """Whether a ``rows x cols`` delta is factored by an exact SVD rather than the sketch.

    Always when the sketch would be no smaller (``min(rows, cols) <= 2q``). On the CPU
    also for small matrices (at most :data:`SMALL_MATRIX` entries, ``lowrank_refactor``'s
    rule): LAPACK does them quickly. Not on another device: there the SVD of a batch
    runs one cuSOLVER call per matrix, while the sketch is batched (bases by
    CholeskyQR2) and its error stays within 1% of the exact truncation's.
    """
    if min(rows, cols) <= 2 * q:
        return True
    return device.type == "cpu" and rows * cols <= SMALL_MATRIX


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp(min=0).sqrt()
    return (u * root[..., None, :]).float(), (root[..., :, None] * vh).float()


def lowrank_factors(D: torch.Tensor, rank: int, *, seed: int = 0,
                    modules: Sequence[str] | str = "", oversample: int | None = None,
                    niter: int = NITER) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of dense deltas: ``lowrank_refactor`` on any device, batched.

    Args:
        D: ``(out, in)`` or ``(batch, out, in)`` float32 on any device.
        rank: Output rank (clamped to ``[1, min(out, in)]``).
        seed: Run seed.
        modules: The module name of each matrix (one string for a 2-D ``D``); with
            ``seed`` it seeds that matrix's sketch.
        oversample: Extra sketch columns (default: :func:`sketch_width`'s).
        niter: Power iterations.

    Returns:
        ``(B, A)`` float32 on ``D``'s device, ``(…, out, rank)`` and ``(…, rank, in)``;
        zero factors for a zero matrix. For a 2-D ``D`` on the CPU, bit for bit
        :func:`merging.lora.factorize.lowrank_refactor` ``(D, rank, seed=seed, module=modules)``.

    Raises:
        ValueError: ``D`` is not 2-D or 3-D, or ``modules`` does not name every matrix.
    """
    single = D.dim() == 2
    if single:
        D = D[None]
        modules = [modules] if isinstance(modules, str) else list(modules)
    if D.dim() != 3 or isinstance(modules, str) or len(modules) != D.shape[0]:
        raise ValueError("lowrank_factors takes (out, in) with one module name or "
                         "(batch, out, in) with one module name per matrix")
    rows, cols = D.shape[-2:]
    rank = max(1, min(rank, rows, cols))
    q = sketch_width(rank, rows, cols, D.device, oversample)
    if exact_svd_wanted(rows, cols, q, D.device):
        with intraop_threads(1) if D.device.type == "cpu" else contextlib.nullcontext():
            u, s, vh = torch.linalg.svd(D, full_matrices=False)
        B, A = _balanced(u[..., :rank], s[..., :rank], vh[..., :rank, :])
    else:
        u, s, v = randomized_svd(D, q, [sketch_seed(seed, name) for name in modules], niter)
        B, A = _balanced(u[..., :rank], s[..., :rank], v[..., :rank].mT)
    nonzero = D.flatten(1).ne(0).any(1)[:, None, None]  # no host sync: a select, not a branch
    B, A = torch.where(nonzero, B, 0.0), torch.where(nonzero, A, 0.0)
    return (B[0], A[0]) if single else (B, A)


def frobenius_errors(D: torch.Tensor, B: torch.Tensor,
                     A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||D - B A||_F, ||D||_F)`` per matrix, accumulated in float64, on ``D``'s device.

    Args:
        D: ``(out, in)`` or ``(batch, out, in)`` float32.
        B: ``(…, out, r)`` factors (any float dtype; used as float32, as stored).
        A: ``(…, r, in)``.

    Returns:
        Two float64 tensors of shape ``D.shape[:-2]``.
    """
    diff = torch.matmul(B.float(), A.float()).sub_(D).neg_()
    return (torch.linalg.vector_norm(diff, dim=(-2, -1), dtype=torch.float64),
            torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64))
