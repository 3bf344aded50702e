"""``breadcrumbs`` and ``breadcrumbs_ties``: Model Breadcrumbs (Davari & Belilovsky, 2023).

Per module, each input's true delta ``ΔW_i = s_i B_i A_i`` loses its outliers and
its small entries: with ``n`` entries, the ``int(gamma · n)`` largest magnitudes
are dropped and the next ``k = int(density · n)`` are kept (when
``density + gamma > 1`` fewer outliers are dropped, so that ``k`` remain;
``density = 1`` keeps everything and ignores ``gamma``), exactly as mergekit's
``sparsify.magnitude_outliers``::

    crumbs(D) = D · [lo <= |D| <= hi],  hi = (top+1)-th largest |D|,
                lo = (top+k)-th largest |D|,  top = min(int(gamma·n), n - k)

``breadcrumbs`` is ``λ · Σ_i w_i crumbs(ΔW_i)`` (``--normalize`` divides by
``Σ_i w_i``: mergekit's ``breadcrumbs`` with ``normalize: true``);
``breadcrumbs_ties`` is ``λ · disjoint_mean(crumbs(ΔW_i))`` with the TIES sign
election of :mod:`merging.lora.sparsify` (``--sign-election mergekit`` is mergekit's
``breadcrumbs_ties`` with ``normalize: true``; mergekit's default,
``normalize: false``, sums the agreeing entries without dividing). Entries tied
with a band edge are all kept (mergekit's sort keeps an arbitrary subset of them;
real-valued deltas have no ties). Defaults: ``gamma`` 0.01, ``density`` 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merging.lora.methods import GroupedForm, MergeParams, ModuleContext, ModuleInput, register_method

if TYPE_CHECKING:
    import torch

    from merging.lora.sparsify import BlockFn


def _crumbs(inputs: Sequence[ModuleInput], params: MergeParams, ctx: ModuleContext) -> BlockFn:
    """The block transform keeping each input's breadcrumbs band."""
    from merging.lora import sparsify

    bands = [sparsify.outlier_band(inp, params.density, params.gamma, ctx) for inp in inputs]
    return lambda pos, inp, block, j: sparsify.band_block(block, *bands[pos])


def _band_group(deltas: torch.Tensor, group: Sequence[Sequence[ModuleInput]],
                contexts: Sequence[ModuleContext], params: MergeParams) -> None:
    """The grouped step: every delta's band from two radix selects."""
    from merging.lora.group_steps import band_group

    band_group(deltas, params.density, params.gamma)


@register_method("breadcrumbs", output="dense",
                 params={"density", "gamma", "lambda", "normalize"},
                 summary="drop the top gamma outliers, keep the next density, weighted sum",
                 grouped=GroupedForm(_band_group, elect=False))
def breadcrumbs(inputs: Sequence[ModuleInput], params: MergeParams,
                ctx: ModuleContext) -> torch.Tensor:
    """Breadcrumbs then weighted sum; dense float32 result."""
    from merging.lora import sparsify

    return sparsify.dense_merge(inputs, params, ctx, transform=_crumbs(inputs, params, ctx),
                                combine=sparsify.weighted_sum, normalize=params.normalize)


@register_method("breadcrumbs_ties", output="dense",
                 params={"density", "gamma", "lambda", "sign_election"},
                 summary="breadcrumbs, then TIES sign election and disjoint mean",
                 grouped=GroupedForm(_band_group, elect=True))
def breadcrumbs_ties(inputs: Sequence[ModuleInput], params: MergeParams,
                     ctx: ModuleContext) -> torch.Tensor:
    """Breadcrumbs then sign election and disjoint mean; dense float32 result."""
    from merging.lora import sparsify

    return sparsify.dense_merge(
        inputs, params, ctx, transform=_crumbs(inputs, params, ctx),
        combine=sparsify.sign_elected(params.sign_election))
