"""``ties``: TIES-Merging (Yadav et al., 2023) on the true deltas.

Per module: trim each input's delta ``ΔW_i = s_i B_i A_i`` to its top ``--density``
fraction by magnitude, elect a sign per entry, and average the weighted entries
that agree with it (disjoint mean), then multiply by ``--lambda``. The default
election (``--sign-election sum``) equals ``peft.utils.merge_utils.ties`` with
``majority_sign_method="total"``; ``frequency`` and ``mergekit`` are described in
:mod:`merging.lora.sparsify`. The dense result is re-factored by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merging.lora.methods import GroupedForm, MergeParams, ModuleContext, ModuleInput, register_method

if TYPE_CHECKING:
    import torch


def trim_select(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
                contexts: Sequence[ModuleContext], params: MergeParams) -> None:
    """TIES's and magnitude_prune's grouped step: each delta trimmed to its top
    ``density`` (:func:`merging.lora.group_steps.trim_group`; imported when run, so that
    the registry imports no torch)."""
    from merging.lora.group_steps import trim_group

    trim_group(deltas, params.density)


@register_method("ties", output="dense", params={"density", "lambda", "sign_election"},
                 summary="trim to top density, elect signs, disjoint mean (TIES)",
                 grouped=GroupedForm(trim_select, elect=True))
def ties(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> torch.Tensor:
    """TIES on the module's true deltas; dense float32 result."""
    from merging.lora import sparsify

    thresholds = [sparsify.magnitude_threshold(inp, params.density, ctx) for inp in inputs]
    return sparsify.dense_merge(
        inputs, params, ctx,
        transform=lambda pos, inp, block, j: sparsify.trim_block(block, thresholds[pos]),
        combine=sparsify.sign_elected(params.sign_election))
