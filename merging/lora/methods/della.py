"""``della`` and ``della_linear``: DELLA-Merging (Deep et al., 2024) on the true deltas.

MAGPRUNE, per module and input: in each row of ``ΔW_i = s_i B_i A_i`` (``c``
columns) the entries are ranked by magnitude, ``rank = 1..c`` from the smallest,
and entry ``x`` is kept with probability

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
like DARE's: input ``i``, rows ``[64j, 64j+64)`` of module ``M`` draw
``torch.rand`` from a generator seeded by ``sha256(seed, M, "della", i, j)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merging.lora.methods import MergeParams, ModuleContext, ModuleInput, register_method

if TYPE_CHECKING:
    import torch

    from merging.lora.sparsify import BlockFn


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

    return sparsify.dense_merge(
        inputs, params, ctx, transform=_magprune(params, ctx),
        combine=sparsify.sign_elected(params.sign_election))


@register_method("della_linear", output="dense",
                 params={"density", "epsilon", "lambda", "normalize"},
                 summary="magnitude-ranked random drop (density ± epsilon), rescale 1/p, weighted sum")
def della_linear(inputs: Sequence[ModuleInput], params: MergeParams,
                 ctx: ModuleContext) -> torch.Tensor:
    """MAGPRUNE then weighted sum; dense float32 result."""
    from merging.lora import sparsify

    return sparsify.dense_merge(inputs, params, ctx, transform=_magprune(params, ctx),
                                combine=sparsify.weighted_sum, normalize=params.normalize)
