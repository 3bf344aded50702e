"""``generation``: fixed prompts give non-empty, non-degenerate greedy output.

For each prompt the candidate decodes greedily (``max_new_tokens``, stopping at
EOS). The output must have at least ``min_chars`` non-space characters, and its
repeated n-gram fraction (``1 - distinct/total`` over token n-grams of size
``ngram``, :func:`gate.evaluate.repeat_fraction`) must not exceed
``max_repeat_fraction``: "the the the the" scores 1.0 on bigrams, fresh text 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gate import policy_fields as f
from gate.check_kinds import CheckParams
from gate.checks import Outcome, num, passed
from gate.evaluate import repeat_fraction

if TYPE_CHECKING:
    from gate.context import GateContext
    from gate.policy import CheckSpec

PARAMS = CheckParams(listed=4, fields={
    "prompts": (f.text_list, f.REQUIRED), "max_new_tokens": (f.int_at_least(1, f.MAX_NEW_TOKENS), 32),
    "min_chars": (f.int_at_least(0), 1), "ngram": (f.int_at_least(1), 3),
    "max_repeat_fraction": (f.number(0, 1), 0.5),
})


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    model = ctx.candidate_model()
    rows, problems = [], []
    prompts = list(spec["prompts"])
    gens = ctx.evaluator.generate_many(model, prompts, [spec["max_new_tokens"]] * len(prompts))
    for prompt, gen in zip(prompts, gens, strict=True):
        chars = len("".join(gen.text.split()))
        frac = repeat_fraction(gen.token_ids, spec["ngram"])
        ok = chars >= spec["min_chars"] and frac <= spec["max_repeat_fraction"]
        rows.append({"prompt": prompt[:200], "output": gen.text[:200], "tokens": len(gen.token_ids),
                     "repeat_fraction": num(frac), "ok": ok})
        if chars < spec["min_chars"]:
            problems.append(f"empty output for {prompt[:40]!r}" if chars == 0 else
                            f"output of {chars} non-space characters (< min_chars "
                            f"{spec['min_chars']}) for {prompt[:40]!r}")
        elif frac > spec["max_repeat_fraction"]:
            problems.append(f"degenerate repetition ({frac:.2f}) for {prompt[:40]!r}: {gen.text[:60]!r}")
    metrics = {"prompts": len(rows), "failed_prompts": sum(not r["ok"] for r in rows),
               "max_repeat_fraction_seen": num(max(r["repeat_fraction"] or 0 for r in rows)),
               "min_output_chars": min(len("".join(r["output"].split())) for r in rows),
               "threshold_max_repeat_fraction": spec["max_repeat_fraction"],
               "threshold_min_chars": spec["min_chars"]}
    ok = not problems
    return passed(ok, f"{len(rows)} prompt(s) give non-empty, non-repetitive output" if ok
                  else "; ".join(problems[:3]), metrics, rows)
