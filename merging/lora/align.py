"""KnOTS: run an entry-wise merge method in the shared SVD basis of the inputs' deltas.

KnOTS (Stoica et al., 2024, "Model merging with SVD to tie the KnOTS") observes
that LoRA updates of different tasks live in poorly aligned subspaces, so
entry-wise methods (TIES, DARE, ...) compare entries that mean different things.
Per module, with the inputs' true deltas ``ΔW_i = s_i B_i A_i`` (``out x in``)::

    [ΔW_1 | ΔW_2 | ... | ΔW_n] = U Σ [V_1^T | V_2^T | ... | V_n^T]      (thin SVD)
    C_i = Σ V_i^T = U^T ΔW_i           (k x in: task i's coefficients in the basis U)
    ΔW  = U · method(C_1, ..., C_n)    (the method's own trim/drop, election, λ, weights)

``U`` is shared by every task, so ``ΔW_i = U C_i`` exactly and the method sees
aligned coordinates. This follows the authors' code (``gstoica27/KnOTS``,
``task_merger.SVDMerger``: concatenation along the input dimension
``concat_across_output=True``, ``s_on_V=True``, the merged ``sV`` re-expressed
as ``U @ sV``), with three differences: the method runs per module (their TIES
trims each task's coefficients of the whole model at once), components with
``σ <= σ_max · 2^-23`` are dropped (theirs: ``σ <= 1e-5``, a threshold that
depends on the deltas' scale), and the SVD is computed from the LoRA factors:
with ``[B_1 | ... | B_n] = Q R`` (thin QR) the concatenation is
``Q · [R_1 A_1 | ... | R_n A_n]`` (``R_i``: the columns of ``R`` of input ``i``),
whose SVD costs ``O(R² · n · in)`` for ``R = Σ r_i``, never an ``out x n·in``
matrix. An SVD fixes each component only up to its sign, and not every
election is sign-symmetric (``frequency`` breaks a tie towards ``+``), so the
sign is fixed: the largest-magnitude entry of each basis vector is positive
(scikit-learn's ``svd_flip`` convention). ``k <= Σ r_i``, and the result is the exact factors ``(U, merged)`` of
rank ``<= Σ r_i`` (stored at its true rank unless ``--rank N`` truncates it).

Inputs that lack the module are left out of the basis, like everywhere else
(their weight still counts in ``--normalize``). DARE and DELLA masks are drawn
as usual, from the module's name and the seed, on the ``k x in`` coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.lora.factorize import RANK_RTOL
from merging.lora.methods import Factors, MergeMethod, MergeParams, ModuleContext, ModuleInput
from merging.threads import intraop_threads


def knots_basis(inputs: Sequence[ModuleInput]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shared basis ``U`` and each input's coefficients ``C_i = U^T ΔW_i``.

    Args:
        inputs: The module's inputs (``B`` with the scale folded in, ``A``).

    Returns:
        ``U`` (``out x k``, orthonormal columns, float32) and the ``k x in`` float32
        coefficient matrices, in input order; ``k == 0`` when every delta is zero.
    """
    with intraop_threads(1):  # LAPACK's bits depend on the thread count (merging.threads)
        q, r = torch.linalg.qr(torch.cat([inp.B for inp in inputs], dim=1).double())
        blocks, start = [], 0
        for inp in inputs:
            rank = inp.A.shape[0]
            blocks.append(r[:, start:start + rank] @ inp.A.double())
            start += rank
        u, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
        keep = int(torch.count_nonzero(s > s[0] * RANK_RTOL)) if s.numel() and float(s[0]) > 0 else 0
        basis = q @ u[:, :keep]
        # one sign per component: the largest-magnitude entry of each basis vector is positive
        signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
        u = u[:, :keep] * signs
        coeffs = [(u.T @ block).float() for block in blocks]
        return (basis * signs).float(), coeffs


def knots_merge(method: MergeMethod, inputs: Sequence[ModuleInput], params: MergeParams,
                ctx: ModuleContext) -> Factors:
    """Merge one module with ``method`` on its KnOTS-aligned coefficients.

    Args:
        method: An entry-wise (``output="dense"``) method.
        inputs: The inputs that have this module.
        params: Resolved parameters (passed to the method as they are).
        ctx: The module (its name and seed seed the method's random masks).

    Returns:
        Exact factors ``(U, merged coefficients)`` of the merged delta.

    Raises:
        ValueError: ``method`` is not entry-wise (a programming error: parameter
            resolution refuses ``align`` for such methods).
    """
    if method.output != "dense":
        raise ValueError(f"KnOTS alignment needs an entry-wise method, not {method.name}")
    rows, cols = ctx.shape
    basis, coeffs = knots_basis(inputs)
    k = basis.shape[1]
    if k == 0:
        return Factors(B=torch.zeros((rows, 1)), A=torch.zeros((1, cols)))
    eye = torch.eye(k)
    aligned = [ModuleInput(index=inp.index, B=eye, A=c, weight=inp.weight)
               for inp, c in zip(inputs, coeffs, strict=True)]
    merged = method.fn(aligned, params, ModuleContext(name=ctx.name, shape=(k, cols), seed=ctx.seed))
    if not isinstance(merged, torch.Tensor):
        merged = merged.B @ merged.A
    return Factors(B=basis, A=merged)
