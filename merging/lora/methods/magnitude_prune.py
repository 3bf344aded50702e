"""``magnitude_prune``: trim each delta to its top ``--density`` fraction, weighted sum.

Like TIES without the sign election: ``λ · Σ_i w_i · trim(ΔW_i)`` (``--normalize``
divides by the sum of weights). Equals ``peft.utils.merge_utils.magnitude_prune``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merging.lora.methods import GroupedForm, MergeParams, ModuleContext, ModuleInput, register_method
from merging.lora.methods.ties import trim_select

if TYPE_CHECKING:
    import torch


@register_method("magnitude_prune", output="dense", params={"density", "lambda", "normalize"},
                 summary="trim each delta to top density by magnitude, weighted sum",
                 grouped=GroupedForm(trim_select, elect=False))
def magnitude_prune(inputs: Sequence[ModuleInput], params: MergeParams,
                    ctx: ModuleContext) -> torch.Tensor:
    """Trim then weighted sum; dense float32 result."""
    from merging.lora import sparsify

    thresholds = [sparsify.magnitude_threshold(inp, params.density, ctx) for inp in inputs]
    return sparsify.dense_merge(
        inputs, params, ctx,
        transform=lambda pos, inp, block, j: sparsify.trim_block(block, thresholds[pos]),
        combine=sparsify.weighted_sum, normalize=params.normalize)
