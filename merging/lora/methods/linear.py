"""``linear``: the weighted sum of the inputs' true deltas, exact.

``ΔW = Σ_i w_i · s_i B_i A_i`` (``--normalize``: divided by ``Σ_i w_i`` over all
inputs, including those that lack the module). Stacking the scaled factors,
``ΔW = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] @ [A_1; A_2; ...]``, gives the sum with no
cross terms (unlike summing A's and B's separately, as PEFT's non-SVD
``add_weighted_adapter`` modes do); the engine then re-factors it exactly to its
true rank (QR of the stacked factors and an SVD of the small core).
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.lora.methods import Factors, MergeParams, ModuleContext, ModuleInput, register_method


def stacked_factors(inputs: Sequence[ModuleInput], scale: float) -> Factors:
    """``[c·w_i·B_i ...] @ [A_i; ...]`` with the weights folded into B."""
    import torch

    return Factors(B=torch.cat([inp.B * (inp.weight * scale) for inp in inputs], dim=1),
                   A=torch.cat([inp.A for inp in inputs], dim=0))


@register_method("linear", output="exact", params={"normalize"},
                 summary="weighted sum of true deltas (exact; --normalize divides by sum of weights)")
def linear(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> Factors:
    """Σ w_i ΔW_i, divided by Σ w_i with ``normalize``."""
    return stacked_factors(inputs, 1.0 / params.weight_sum if params.normalize else 1.0)
