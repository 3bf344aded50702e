"""``perplexity``: held-out perplexity does not rise more than allowed.

The candidate's perplexity on ``data`` (JSONL ``{"text": ...}`` or plain text) must
be finite and, with ``max_increase: x``, at most ``(1 + x)`` times the baseline's:

* ``base``: the base model without any adapter (default);
* ``parents``: the *worst* (highest) parent perplexity: a merge may not be worse
  than the worst of its inputs by more than ``x``;
* ``release``: the version the ``release`` alias points at (skipped, with a note,
  before anything is released).

``max`` is an absolute ceiling that applies whatever the baseline.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gate import policy_fields as f
from gate.check_kinds import CheckParams
from gate.checks import Outcome, num, passed, skip
from gate.eval_data import read_texts

if TYPE_CHECKING:
    from gate.context import GateContext
    from gate.policy import CheckSpec

BASELINES = ("base", "parents", "release")
PARAMS = CheckParams(listed=2, fields={
    "data": (f.path, f.REQUIRED), "field": (f.text, "text"),
    "baseline": (f.choice(*BASELINES), "base"),
    "max_increase": (f.optional(f.number(0)), None), "max": (f.optional(f.number(1)), None),
    "limit": (f.int_at_least(1), 256),
}, files=("data",), one_of=("max_increase", "max"))


def _baseline(spec: CheckSpec, ctx: GateContext, texts: list[str]) -> tuple[float | None, str]:
    ev = ctx.evaluator
    kind = spec["baseline"]
    if kind == "base":
        return ev.perplexity(ev.base(), texts), "base"
    if kind == "parents":
        if not ctx.candidate.parents:
            raise LookupError("baseline 'parents' but the candidate has no parents in its lineage")
        values = {p.name: ev.perplexity(ctx.parent_model(p), texts) for p in ctx.candidate.parents}
        worst = max(values, key=lambda k: values[k])
        return values[worst], f"parent {worst}"
    model, release = ctx.release_model(), ctx.release()
    if model is None or release is None:
        return None, ctx.release_note
    return ev.perplexity(model, texts), f"release {release.label}"


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    texts = read_texts(spec.data_file("data"), field=spec["field"], limit=spec["limit"])
    cand = ctx.evaluator.perplexity(ctx.candidate_model(), texts)
    try:
        base, label = _baseline(spec, ctx, texts)
    except LookupError as err:
        return Outcome("error", str(err))
    metrics: dict[str, Any] = {"perplexity": num(cand), "baseline": spec["baseline"],
                               "baseline_perplexity": num(base), "documents": len(texts)}
    if not math.isfinite(cand):
        return passed(False, "perplexity is not finite (NaN/inf logits)", metrics)
    problems = []
    if spec["max"] is not None:
        metrics["threshold_max"] = spec["max"]
        if not cand <= spec["max"]:
            problems.append(f"perplexity {num(cand)} > max {spec['max']}")
    relative = spec["max_increase"] is not None
    if relative and base is not None:
        increase = cand / base - 1.0
        metrics.update(increase=num(increase), threshold_max_increase=spec["max_increase"])
        if not increase <= spec["max_increase"]:
            problems.append(f"perplexity {num(cand)} is {increase:+.1%} over {label} "
                            f"({num(base)}), more than {spec['max_increase']:.1%}")
    if relative and base is None and spec["max"] is None and not problems:
        return skip(f"perplexity {num(cand)}; {label}", metrics)
    ok = not problems
    if ok:
        vs = f" vs {num(base)} for {label}" if base is not None else ""
        return passed(True, f"perplexity {num(cand)}{vs}", metrics)
    return passed(False, "; ".join(problems), metrics)
