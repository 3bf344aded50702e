"""``drift``: a derived model stays close to the model it was made from.

The **source** is what the candidate was made from (:mod:`gate.context`): for an
unloaded model, its adapter applied to the base; for a quantized model, the
unquantized model (its record's ``location``, or ``--source DIR``), checked against
its record before anything runs. Adapters and merges have no source: the check is
skipped with a message saying so.

On the held-out text of ``data`` (JSONL ``{"text": ...}`` or plain text, cut into
windows of the policy's ``max_length`` tokens), both models score every position
and the check reports, over all positions of all windows:

* ``mean_kl``: mean KL divergence of the next-token distributions,
  ``KL(source || candidate) = sum_v p_s(v) (log p_s(v) - log p_c(v))`` (nats),
  computed from float32 ``log_softmax`` of each model's logits;
* ``top1_agreement``: share of positions where both models' argmax agree;
* ``max_logit_diff``: the largest ``|logit_c - logit_s|`` anywhere.

Thresholds, each optional but at least one required: ``max_kl``, ``min_top1`` and
``max_logit_diff``. This is how a policy says "nf4 may cost at most X": an unload
in float32 drifts by float rounding only (KL ~1e-12), a good nf4 quantization by a
little, an over-quantized one (a huge block size, corrupted scales) by a lot. Windows
are scored in batches, source and candidate alternately, so memory holds one
batch's logits per model rather than the whole text's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gate import policy_fields as f
from gate.check_kinds import CheckParams
from gate.checks import Outcome, num, passed, skip
from gate.decoding import BATCH_SIZE
from gate.eval_data import read_texts

if TYPE_CHECKING:
    import torch

    from gate.context import GateContext
    from gate.policy import CheckSpec

PARAMS = CheckParams(listed=5, fields={
    "data": (f.path, f.REQUIRED), "field": (f.text, "text"), "limit": (f.int_at_least(1), 64),
    "max_kl": (f.optional(f.number(0)), None), "min_top1": (f.optional(f.number(0, 1)), None),
    "max_logit_diff": (f.optional(f.number(0)), None),
}, files=("data",), one_of=("max_kl", "min_top1", "max_logit_diff"))


def drift_stats(source_logits: torch.Tensor, candidate_logits: torch.Tensor) -> dict[str, float]:
    """Sums over the positions of one window: ``kl_sum``, ``agree``, ``positions``, ``max_diff``.

    Both arguments are float logits ``(positions, vocab)`` of the same tokens.
    """
    import torch

    log_s = torch.log_softmax(source_logits.double(), dim=-1)
    log_c = torch.log_softmax(candidate_logits.double(), dim=-1)
    kl = (log_s.exp() * (log_s - log_c)).sum(-1)
    diff = (candidate_logits.double() - source_logits.double()).abs()
    finite = bool(torch.isfinite(diff).all()) and bool(torch.isfinite(kl).all())
    return {"kl_sum": float(kl.sum()) if finite else math.inf,
            "agree": int((source_logits.argmax(-1) == candidate_logits.argmax(-1)).sum()),
            "positions": int(source_logits.shape[0]),
            "max_diff": float(diff.max()) if finite else math.inf}


def measure(ctx: GateContext, texts: list[str]) -> dict[str, Any]:
    """Mean KL, top-1 agreement and max |logit diff| of the candidate vs its source."""
    ev = ctx.evaluator
    windows = ev.windows(texts)
    if not windows:
        raise LookupError("held-out text encodes to no tokens")
    source = ctx.source_model()
    if source is None:
        raise LookupError(f"the source of {ctx.candidate.label} has no directory to load")
    kl_sum, max_diff = 0.0, 0.0
    agree: float = 0  # sums of drift_stats' whole-number counts
    positions: float = 0
    for start in range(0, len(windows), BATCH_SIZE):
        chunk = windows[start:start + BATCH_SIZE]
        reference = ev.logits_many(source, chunk)
        got = ev.logits_many(ctx.candidate_model(), chunk)
        for ref, cand in zip(reference, got, strict=True):
            stats = drift_stats(ref, cand)
            kl_sum += stats["kl_sum"]
            agree += stats["agree"]
            positions += stats["positions"]
            max_diff = max(max_diff, stats["max_diff"])
    return {"mean_kl": kl_sum / positions, "top1_agreement": agree / positions,
            "max_logit_diff": max_diff, "positions": positions, "windows": len(windows)}


def shown(value: float) -> float | str:
    """A measured value for metrics and messages: rounded, or ``"inf"`` (NaN/inf logits)."""
    rounded = num(value)  # None exactly when value is NaN/inf
    return "inf" if rounded is None else rounded


def _problems(spec: Any, found: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    problems, thresholds = [], {}
    kl, top1, diff = found["mean_kl"], found["top1_agreement"], found["max_logit_diff"]
    if spec["max_kl"] is not None:
        thresholds["threshold_max_kl"] = spec["max_kl"]
        if not kl <= spec["max_kl"]:
            problems.append(f"mean KL {shown(kl)} > max_kl {spec['max_kl']}")
    if spec["min_top1"] is not None:
        thresholds["threshold_min_top1"] = spec["min_top1"]
        if not top1 >= spec["min_top1"]:
            problems.append(f"top-1 agreement {top1:.3f} < min_top1 {spec['min_top1']}")
    if spec["max_logit_diff"] is not None:
        thresholds["threshold_max_logit_diff"] = spec["max_logit_diff"]
        if not diff <= spec["max_logit_diff"]:
            problems.append(f"max |logit diff| {shown(diff)} > max_logit_diff "
                            f"{spec['max_logit_diff']}")
    return problems, thresholds


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    cand = ctx.candidate
    if cand.source is None:
        return skip(f"{cand.label} has no source model (an adapter or merge is not derived "
                    "from a model); drift applies to unloaded and quantized models")
    texts = read_texts(spec.data_file("data"), field=spec["field"], limit=spec["limit"])
    try:
        found = measure(ctx, texts)
    except LookupError as err:
        return Outcome("error", str(err))
    metrics: dict[str, Any] = {"source": cand.source.label, "mean_kl": shown(found["mean_kl"]),
                               "top1_agreement": num(found["top1_agreement"]),
                               "max_logit_diff": shown(found["max_logit_diff"]),
                               "positions": found["positions"], "documents": len(texts)}
    problems, thresholds = _problems(spec, found)
    metrics.update(thresholds)
    summary = (f"mean KL {metrics['mean_kl']}, top-1 {found['top1_agreement']:.3f}, max |logit "
               f"diff| {metrics['max_logit_diff']} vs {cand.source.label}")
    return passed(not problems, summary if not problems else "; ".join(problems), metrics)
