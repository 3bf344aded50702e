"""``task_arithmetic``: ``λ · Σ_i w_i ΔW_i`` (exact, like ``linear``).

Task vectors (Ilharco et al., 2023) added with a global scaling ``--lambda``
(mergekit's ``task_arithmetic``); ``--normalize`` divides by the sum of weights
first.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.lora.methods import Factors, MergeParams, ModuleContext, ModuleInput, register_method
from merging.lora.methods.linear import stacked_factors


@register_method("task_arithmetic", output="exact", params={"lambda", "normalize"},
                 summary="lambda x weighted sum of true deltas (exact)")
def task_arithmetic(inputs: Sequence[ModuleInput], params: MergeParams,
                    ctx: ModuleContext) -> Factors:
    """λ Σ w_i ΔW_i (÷ Σ w_i with ``normalize``)."""
    scale = params.lam / params.weight_sum if params.normalize else params.lam
    return stacked_factors(inputs, scale)
