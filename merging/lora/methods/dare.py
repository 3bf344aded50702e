"""``dare_linear`` and ``dare_ties``: DARE (Yu et al., 2024) on the true deltas.

Each entry of each input's delta is kept with probability ``--density`` and the
kept entries are rescaled by ``1/density`` (drop-and-rescale). ``dare_linear``
then takes the weighted sum (``--normalize``: divided by the sum of weights);
``dare_ties`` elects signs and takes the disjoint mean like TIES. Both multiply by
``--lambda``. They equal ``peft.utils.merge_utils.dare_linear`` / ``dare_ties``
given the same masks. Masks are reproducible: one generator per (module, input)
seeded from ``sha256(seed, module, "dare", input index, row block)`` (see
:mod:`merging.lora.sparsify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merging.lora.methods import GroupedForm, MergeParams, ModuleContext, ModuleInput, register_method

if TYPE_CHECKING:
    import torch

    from merging.lora.sparsify import BlockFn


def _dropper(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> BlockFn:
    from merging.lora import sparsify

    return lambda pos, inp, block, j: sparsify.dare_block(
        block, params.density, sparsify.dare_generator(ctx, inp.index, j))


def _drop_group(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
                contexts: Sequence[ModuleContext], params: MergeParams) -> None:
    """The grouped step: the same masks, drawn for a whole group at once."""
    from merging.lora.group_steps import dare_group

    dare_group(deltas, group, contexts, params.density)


@register_method("dare_linear", output="dense", params={"density", "lambda", "normalize"},
                 summary="random drop (keep p=density), rescale 1/density, weighted sum",
                 grouped=GroupedForm(_drop_group, elect=False))
def dare_linear(inputs: Sequence[ModuleInput], params: MergeParams,
                ctx: ModuleContext) -> torch.Tensor:
    """DARE then weighted sum; dense float32 result."""
    from merging.lora import sparsify

    return sparsify.dense_merge(inputs, params, ctx, transform=_dropper(inputs, params, ctx),
                                combine=sparsify.weighted_sum, normalize=params.normalize)


@register_method("dare_ties", output="dense", params={"density", "lambda", "sign_election"},
                 summary="random drop and rescale, then TIES sign election and disjoint mean",
                 grouped=GroupedForm(_drop_group, elect=True))
def dare_ties(inputs: Sequence[ModuleInput], params: MergeParams,
              ctx: ModuleContext) -> torch.Tensor:
    """DARE then sign election and disjoint mean; dense float32 result."""
    from merging.lora import sparsify

    return sparsify.dense_merge(
        inputs, params, ctx, transform=_dropper(inputs, params, ctx),
        combine=sparsify.sign_elected(params.sign_election))
