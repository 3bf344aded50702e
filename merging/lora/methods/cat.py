"""``cat``: exact concatenation of the scaled factors, stored as is.

``B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]``, ``A = [A_1; A_2; ...]``: the output rank
is the sum of the input ranks and ``B @ A = Σ_i w_i ΔW_i`` exactly (PEFT's
``cat``). Unlike ``linear`` it is not re-factored (unless ``--rank N`` asks for a
truncation), so each input's factors can be read back from the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.lora.methods import Factors, MergeParams, ModuleContext, ModuleInput, register_method
from merging.lora.methods.linear import stacked_factors


@register_method("cat", output="concat", params=set(),
                 summary="concatenate the weighted factors (exact, rank = sum of ranks)")
def cat(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> Factors:
    """Stack ``w_i s_i B_i`` and ``A_i``."""
    return stacked_factors(inputs, 1.0)
