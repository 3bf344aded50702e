"""``della`` and ``della_linear``: DELLA-Merging (Deep et al., 2024) on the true deltas.

MAGPRUNE, per module and input: in each row of the weight's delta as the model stores
it (``c`` columns: a row of ``ΔW_i = s_i B_i A_i``; a column of it for embeddings and
``fan_in_fan_out`` layers, which store the transpose) the entries are ranked by
magnitude, ``rank = 1..c`` from the smallest, and entry ``x`` is kept with probability

    p(x) = (density - ε) + 2ε · (rank(x) - 1) / (c - 1)      ∈ [density - ε, density + ε]

(the drop probability ``1 - p`` is smallest for the largest entries) and, if kept,
rescaled by ``1/p`` so that its expectation is ``x``. This is mergekit's
``sparsify.della_magprune`` ranking and probabilities with the paper's ``1/p``
rescaling (mergekit's ``rescale: true`` instead rescales the masked tensor to the
original's L1 norm). ``ε`` is ``--epsilon`` (default 0.15, mergekit's), with
``density ± ε`` in (0, 1) unless ``density = 1`` (keep everything). Ties in a
row's ranking follow column order (mergekit: arbitrary).

``della`` then elects signs and takes the disjoint mean like TIES
(``--sign-election mergekit`` is mergekit's ``della``, whose default is
``normalize: true``); ``della_linear`` takes ``Σ_i w_i`` of them (``--normalize``
divides by ``Σ_i w_i``). Both multiply by ``--lambda``. Masks are reproducible
like DARE's: input ``i``, rows ``[64j, 64j+64)`` of module ``M``'s stored weight draw
``torch.rand`` from a generator seeded by ``sha256(seed, M, "della", i, j)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from merging.lora.methods import MergeParams, ModuleContext, ModuleInput, register_method

if TYPE_CHECKING:
    import torch

    from merging.lora.sparsify import BlockFn


def _on_stored_rows(merge: Callable[[Sequence[ModuleInput], ModuleContext], torch.Tensor],
                    inputs: Sequence[ModuleInput], ctx: ModuleContext) -> torch.Tensor:
    """``merge`` on the rows of the weight as stored: for a transposed module, on the
    inputs' transposes (factors swapped), and the result transposed back."""
    if not ctx.transposed:
        return merge(inputs, ctx)
    flipped = [replace(inp, B=inp.A.T.contiguous(), A=inp.B.T.contiguous()) for inp in inputs]
    rows, cols = ctx.shape
    return merge(flipped, replace(ctx, shape=(cols, rows))).T.contiguous()


def _magprune(params: MergeParams, ctx: ModuleContext) -> BlockFn:
    """The block transform drawing each input's DELLA mask."""
    from merging.lora import sparsify

    return lambda pos, inp, block, j: sparsify.della_block(
        block, params.density, params.epsilon, sparsify.della_generator(ctx, inp.index, j))


@register_method("della", output="dense", params={"density", "epsilon", "lambda", "sign_election"},
                 summary="magnitude-ranked random drop (density ± epsilon), rescale 1/p, TIES")
def della(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> torch.Tensor:
    """MAGPRUNE then sign election and disjoint mean; dense float32 result."""
    from merging.lora import sparsify

    return _on_stored_rows(lambda inp, c: sparsify.dense_merge(
        inp, params, c, transform=_magprune(params, c),
        combine=sparsify.sign_elected(params.sign_election)), inputs, ctx)


@register_method("della_linear", output="dense",
                 params={"density", "epsilon", "lambda", "normalize"},
                 summary="magnitude-ranked random drop (density ± epsilon), rescale 1/p, weighted sum")
def della_linear(inputs: Sequence[ModuleInput], params: MergeParams,
                 ctx: ModuleContext) -> torch.Tensor:
    """MAGPRUNE then weighted sum; dense float32 result."""
    from merging.lora import sparsify

    return _on_stored_rows(lambda inp, c: sparsify.dense_merge(
        inp, params, c, transform=_magprune(params, c), combine=sparsify.weighted_sum,
        normalize=params.normalize), inputs, ctx)
