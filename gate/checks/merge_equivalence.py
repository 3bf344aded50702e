"""``merge_equivalence``: a linear-family merge behaves like its parents applied together.

For ``linear``, ``cat`` and ``task_arithmetic`` merges the merged delta should be
``Σ c_i ΔW_i`` with ``c_i = w_i`` (times ``lambda`` for task arithmetic, divided by
``Σ w_j`` with ``normalize``), the weights and parameters read from the candidate's
lineage record. The reference model is built from the *parents*, without PEFT
(:meth:`gate.evaluate.Evaluator.with_deltas`); the candidate is loaded with PEFT.
On every prompt the float32 logits are compared:

* ``max_abs_diff``: largest absolute logit difference (threshold ``max_abs_diff``);
* ``top1_agreement``: share of positions whose argmax agrees
  (threshold ``min_top1_agreement``, optional).

Merges by other methods (TIES, DARE, magnitude pruning) are not expected to be
equivalent and are skipped, as are candidates without lineage. An unloaded model of
a merge is compared the same way (method, weights and parents come from the merge it
was made from, through the lineage); a quantized one is skipped: its distance from
the unquantized model is what the ``drift`` check measures.
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

LINEAR_METHODS = ("linear", "cat", "task_arithmetic")
PARAMS = CheckParams(listed=1, fields={
    "prompts": (f.optional(f.text_list), None), "data": (f.optional(f.path), None),
    "max_abs_diff": (f.number(0), 1e-3), "min_top1_agreement": (f.optional(f.number(0, 1)), None),
    "methods": (f.choice_list(*LINEAR_METHODS), list(LINEAR_METHODS)), "limit": (f.int_at_least(1), 16),
}, files=("data",), one_of=("prompts", "data"), one_of_why="text to compare logits on")


def coefficients(method: str, parameters: dict[str, Any], weights: list[float | None]) -> list[float]:
    """The factor each parent's delta carries in a linear-family merge."""
    w = [1.0 if x is None else float(x) for x in weights]
    scale = float(parameters.get("lambda") or 1.0) if method == "task_arithmetic" else 1.0
    if parameters.get("normalize"):
        total = sum(w)
        scale = scale / total if total else scale
    return [x * scale for x in w]


def rounding_hint(dtype: str, max_abs: float, peak: float) -> str:
    """Why a 16-bit evaluation may miss a float32-sized threshold, when that is all it is.

    The merged model adds ``W + ΔW`` once and rounds; the reference adds the deltas
    and rounds differently, so in 16 bits the logits differ by a few steps of the
    dtype at their own size even for an exact merge (one bfloat16 step at logits near
    3 is 0.0156). A difference within 8 such steps gets the hint; a larger one does not.
    """
    if dtype == "float32" or not (math.isfinite(max_abs) and math.isfinite(peak)) or peak <= 0:
        return ""
    step = 2.0 ** (math.floor(math.log2(peak)) - (7 if dtype == "bfloat16" else 10))
    if max_abs > 8 * step:
        return ""
    # powers of two, printed exactly: a rounded 0.0156 would name a threshold 0.015625 fails
    return (f" ({dtype} evaluation rounds logits near {peak:.3g} in steps of {step!r}: set the "
            f"policy's dtype to float32, or allow max_abs_diff >= {8 * step!r})")


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    import torch

    cand = ctx.candidate
    method = cand.method
    if method is None:
        return skip("candidate has no lineage recipe (not a merge)")
    if cand.kind == "model" and cand.quantized:
        return skip("quantized model: not expected to equal its parents exactly (the drift "
                    "check measures how far it is from its source)", {"method": method})
    if method not in spec["methods"]:
        return skip(f"method {method!r} is not linear; equivalence is not expected",
                    {"method": method})
    if not cand.parents:
        return Outcome("error", "lineage names no parents to compare with", {"method": method})
    coeffs = coefficients(method, cand.parameters, [p.weight for p in cand.parents])
    prompts = list(spec["prompts"] or [])
    if spec["data"]:
        prompts += read_texts(spec.data_file("data"), limit=spec["limit"])
    prompts = prompts[:spec["limit"]]
    ev = ctx.evaluator
    reference = ev.with_deltas("parents-together", [(p.dir, c) for p, c in zip(cand.parents, coeffs, strict=True)])
    ref_logits = [ev.logits(reference, t) for t in prompts]
    model = ctx.candidate_model()
    max_abs, agree, total, peak = 0.0, 0, 0, 0.0
    for text, ref in zip(prompts, ref_logits, strict=True):
        got = ev.logits(model, text)
        diff = (got - ref).abs()
        max_abs = max(max_abs, float(diff.max()) if torch.isfinite(diff).all() else float("inf"))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += got.shape[0]
        peak = max(peak, float(ref.abs().max()))
    top1 = agree / total if total else 1.0
    metrics = {"method": method, "coefficients": [num(c) for c in coeffs], "prompts": len(prompts),
               "max_abs_diff": num(max_abs) if max_abs != float("inf") else "inf",
               "max_rel_diff": num(max_abs / peak) if peak and max_abs != float("inf") else None,
               "top1_agreement": num(top1), "threshold_max_abs_diff": spec["max_abs_diff"]}
    problems = []
    if not max_abs <= spec["max_abs_diff"]:
        problems.append(f"max |logit diff| {metrics['max_abs_diff']} > {spec['max_abs_diff']}"
                        + rounding_hint(ev.dtype_name, max_abs, peak))
    if spec["min_top1_agreement"] is not None:
        metrics["threshold_min_top1_agreement"] = spec["min_top1_agreement"]
        if top1 < spec["min_top1_agreement"]:
            problems.append(f"top-1 agreement {top1:.3f} < {spec['min_top1_agreement']}")
    ok = not problems
    msg = (f"{method} merge matches its parents applied together (max |logit diff| "
           f"{metrics['max_abs_diff']})") if ok else "; ".join(problems)
    return passed(ok, msg, metrics)
