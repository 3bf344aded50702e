"""``retention``: the candidate keeps what each parent could do.

``sets`` maps a name to a JSONL eval set of ``{"prompt", "answer"}`` pairs. With
``baseline: parents`` (default) the name is a parent's name in the candidate's
lineage, and the baseline score is that parent's own score on its own set; with
``baseline: release`` the names are just labels and the baseline is the current
release's score (skipped before anything is released). Per set:
``candidate >= min_ratio x baseline`` and ``candidate >= min_score``.

Metrics (both in [0, 1], so ratios mean the same thing for either):

* ``exact_match``: share of prompts whose greedy continuation (up to the answer's
  token count + 2 new tokens, or ``max_new_tokens``; cut at the first ``stop``
  string) matches the answer (:func:`gate.evaluate.answer_matches`);
* ``loglik``: ``exp`` of the mean per-token log-likelihood of the answers (the
  geometric-mean probability of an answer token).

A baseline score of 0 leaves nothing to retain: the ratio is not computed and only
``min_score`` applies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gate import policy_fields as f
from gate.check_kinds import CheckParams
from gate.checks import Outcome, num, passed, skip
from gate.eval_data import read_pairs
from gate.evaluate import answer_matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gate.context import GateContext
    from gate.evaluate import Evaluator
    from gate.policy import CheckSpec

PARAMS = CheckParams(listed=3, fields={
    "sets": (f.path_map, f.REQUIRED),
    "metric": (f.choice("exact_match", "loglik"), "exact_match"),
    "baseline": (f.choice("parents", "release"), "parents"),
    "min_ratio": (f.optional(f.number(0)), None), "min_score": (f.optional(f.number(0, 1)), None),
    "max_new_tokens": (f.optional(f.int_at_least(1, f.MAX_NEW_TOKENS)), None), "stop": (f.stop_list, ["\n"]),
    "case_sensitive": (f.boolean, True), "limit": (f.int_at_least(1), 256),
}, file_maps=("sets",), one_of=("min_ratio", "min_score"))


def score(spec: CheckSpec, ev: Evaluator, model: PreTrainedModel, pairs: list[tuple[str, str]]) -> float:
    """The set's score for ``model`` under the policy's metric."""
    if spec["metric"] == "loglik":
        scored = ev.answer_logprobs(model, pairs)
        total, count = sum(logp for logp, _ in scored), sum(n for _, n in scored)
        return math.exp(total / count) if count and math.isfinite(total) else 0.0
    budgets = [spec["max_new_tokens"] or ev.answer_tokens(prompt, answer) + 2
               for prompt, answer in pairs]
    gens = ev.generate_many(model, [prompt for prompt, _ in pairs], budgets, stop=spec["stop"])
    hits = sum(answer_matches(gen.text, answer, spec["case_sensitive"])
               for gen, (_, answer) in zip(gens, pairs, strict=True))
    return hits / len(pairs)


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    ev = ctx.evaluator
    by_parents = spec["baseline"] == "parents"
    release_model = None if by_parents else ctx.release_model()
    if not by_parents and release_model is None:
        return skip(ctx.release_note)
    rows, problems = [], []
    for set_name, written in spec["sets"].items():
        pairs = read_pairs(spec.data_file(f"sets.{set_name}"), limit=spec["limit"])
        if by_parents:
            parent = ctx.parent_named(set_name)
            if parent is None:
                names = ", ".join(p.name for p in ctx.candidate.parents) or "none"
                problems.append(f"{set_name}: not a parent of the candidate (parents: {names})")
                rows.append({"set": set_name, "error": "not a parent"})
                continue
            baseline = score(spec, ev, ctx.parent_model(parent), pairs)
        elif release_model is not None:  # always, past the skip above
            baseline = score(spec, ev, release_model, pairs)
        cand = score(spec, ev, ctx.candidate_model(), pairs)
        ratio = cand / baseline if baseline > 0 else None
        ok = True
        if spec["min_ratio"] is not None and ratio is not None and ratio < spec["min_ratio"]:
            ok = False
            problems.append(f"{set_name}: {spec['metric']} {cand:.3f} is {ratio:.2f}x the "
                            f"{'parent' if by_parents else 'release'}'s {baseline:.3f} "
                            f"(< {spec['min_ratio']})")
        if spec["min_score"] is not None and cand < spec["min_score"]:
            ok = False
            problems.append(f"{set_name}: {spec['metric']} {cand:.3f} < min_score {spec['min_score']}")
        rows.append({"set": set_name, "file": written, "items": len(pairs), "candidate": num(cand),
                     "baseline": num(baseline), "ratio": num(ratio), "ok": ok})
    metrics: dict[str, Any] = {"metric": spec["metric"], "baseline": spec["baseline"]}
    for row in rows:
        if "candidate" in row:
            metrics[f"{row['set']}.candidate"] = row["candidate"]
            metrics[f"{row['set']}.baseline"] = row["baseline"]
            metrics[f"{row['set']}.ratio"] = row["ratio"]
    if spec["min_ratio"] is not None:
        metrics["threshold_min_ratio"] = spec["min_ratio"]
    if spec["min_score"] is not None:
        metrics["threshold_min_score"] = spec["min_score"]
    ok = not problems
    summary = ", ".join(f"{r['set']} {r['candidate']}/{r['baseline']}" for r in rows if "candidate" in r)
    return passed(ok, f"retained on every set ({summary})" if ok else "; ".join(problems),
                  metrics, rows)
