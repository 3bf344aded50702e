"""Search merges of the demo's two SmolLM2 adapters under the demo's gate policy.

Runs after ``examples/demo.py`` (``make demo``), in the same ``.adapters-demo/`` store
and work directory, reusing its helpers (``demo.adapters`` runs the CLI in-process):

1. ``adapters merge-search smollm2-reverse:candidate smollm2-arith:candidate`` over
   ``ties``, ``dare_ties`` and ``breadcrumbs_ties``, each with and without KnOTS
   alignment (``align: [none, knots]`` is part of the default space), weights,
   density, lambda, gamma and sign election, under the demo policy (retention of each
   task as objectives, perplexity too, every check a constraint); the pick is pushed
   as a version of ``smollm2-skills`` and the front is drawn to ``search-front.png``
   when matplotlib is installed;
2. ``adapters gate`` on the pick: the real gate's verdict (the search computes the
   gate's numbers for retention and perplexity, on weights bit-identical to the gate's
   model, but checks such as drift or the fingerprint only the gate runs, and only a
   gate run is a gate record);
3. the pick scored by the demo's own scorer, printed beside the base, the adapters and
   the hand-picked merges of ``demo.py`` (their cached scores), with the goal: a passing
   merge whose worse task keeps more than the hand-picked TIES's worse task. Written
   to ``.adapters-demo/search-results.md``.

Usage: ``python examples/search_demo.py [--trials N] [--seed S] [--demo-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import demo  # noqa: E402  (sets up paths, env, warnings like the demo)

METHODS = "ties,dare_ties,breadcrumbs_ties"
HAND_PICKED = [m for m, _ in demo.MERGES]


def main() -> int:
    parser = argparse.ArgumentParser(description="merge search on the demo's SmolLM2 adapters")
    parser.add_argument("--demo-dir", type=Path, default=demo.ROOT / ".adapters-demo")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    demo_dir = args.demo_dir.resolve()
    store, work = demo_dir / "store", demo_dir / "work"
    policy = work / "gate-policy.yaml"
    if not (store / "names" / demo.NAMES[demo.TASK_B]).is_dir() or not policy.is_file():
        print("error: run `make demo` first (its store and policy are the inputs)", file=sys.stderr)
        return 2
    os.environ["ADAPTERS_HOME"] = str(store)
    os.environ.setdefault("ADAPTERS_ACTOR", "demo")
    import smollm2

    base = smollm2.convert(work)
    start = time.perf_counter()
    demo.banner(f"1. merge-search: {METHODS} (x KnOTS), {args.trials} trials, seed {args.seed}")
    refs = [f"{demo.NAMES[t]}:candidate" for t in (demo.TASK_A, demo.TASK_B)]
    db = work / "search-study.db"
    db.unlink(missing_ok=True)  # a fresh search each run (the time below is the search's)
    search = ["merge-search", *refs, "--base", base, "--policy", policy, "--methods", METHODS,
              "--trials", args.trials, "--seed", args.seed, "--name", demo.PRODUCT,
              "--storage", f"sqlite:///{db}"]
    demo.adapters(*search, "--plot", demo_dir / "search-front.png", capture=False, ok=(0, 1))
    _, result = demo.adapters(*search, ok=(0, 1))  # the study is full: no trial runs, as JSON
    search_s = time.perf_counter() - start
    if not isinstance(result, dict) or not result.get("pushed"):
        print(f"no trial passed the policy in {args.trials} trials; nothing to compare "
              f"({search_s:.0f} s)")
        return 1
    ref = result["pushed"]["version"]["ref"]
    picked = result["picked"]

    demo.banner("2. the real gate on the pick")
    code, gate = demo.adapters("gate", ref, "--base", base, "--policy", policy, ok=(0, 1))
    for check in (gate or {}).get("checks", []) if isinstance(gate, dict) else []:
        print(f"    {check['status']:>5} {check['name']}: {check.get('message', '')}")

    demo.banner("3. the pick beside the hand-picked merges")
    from registry.storage.store import Store
    from score import Scorer

    pick_dir = work / "merged" / "search-pick"
    if pick_dir.exists():
        import shutil

        shutil.rmtree(pick_dir)
    Store.open(store).materialize(ref, pick_dir)
    scorer = Scorer(base, {t: work / "data" / t / "eval.jsonl" for t in (demo.TASK_A, demo.TASK_B)},
                    work / "data" / "heldout.txt", work / "scores.json")
    cached = {label: s for label, s in _known_scores(scorer, work).items()}
    label = f"search pick #{picked['number']} ({_label(picked)})"
    cached[label] = scorer.score("search-pick", pick_dir)
    report(demo_dir, cached, label, code == 0, result, search_s)
    return 0


def _label(row: dict) -> str:
    align = (row.get("parameters") or {}).get("align")
    return row["method"] + (f"+{align}" if align else "")


def _known_scores(scorer, work: Path) -> dict[str, dict[str, float]]:
    """Base, adapters and hand-picked merges, scored (cached by demo.py's run)."""
    out = {"base": scorer.score("base", None)}
    for t, name in demo.NAMES.items():
        adir = next((p for p in sorted((work / "adapters").glob(f"{t}-*"))
                     if (p / "adapter_model.safetensors").is_file()), None)
        if adir is not None:
            out[f"adapter {name}"] = scorer.score(name, adir)
    for method in HAND_PICKED:
        mdir = work / "merged" / method
        if (mdir / "adapter_model.safetensors").is_file():
            out[f"merge {method} (hand-picked)"] = scorer.score(method, mdir)
    return out


def report(demo_dir: Path, scores: dict, pick_label: str, gate_passed: bool, result: dict,
           search_s: float) -> None:
    """Print the comparison table and the goal's verdict; write search-results.md."""
    a, b = demo.TASK_A, demo.TASK_B
    header = ["model", f"{a} EM", f"{b} EM", "worse task", "held-out ppl"]
    rows = [[label, f"{s[a]:.1%}", f"{s[b]:.1%}", f"{min(s[a], s[b]):.1%}", f"{s['ppl']:.1f}"]
            for label, s in scores.items()]
    demo.print_table("SmolLM2-135M-Instruct: hand-picked merges vs the merge search", header, rows)
    ties = scores.get("merge ties (hand-picked)")
    pick = scores[pick_label]
    worse_pick = min(pick[a], pick[b])
    if ties is None:
        verdict = "hand-picked TIES not scored (run `make demo`)"
    else:
        worse_ties = min(ties[a], ties[b])
        won = gate_passed and worse_pick > worse_ties
        verdict = (f"goal {'MET' if won else 'NOT met'}: the pick's worse task keeps "
                   f"{worse_pick:.1%} vs {worse_ties:.1%} for hand-picked TIES; gate "
                   f"{'passed' if gate_passed else 'FAILED'}")
    feasible = sum(t["feasible"] for t in result["trials"])
    summary = (f"search: {len(result['trials'])} trials ({feasible} passing the policy), study "
               f"{result['study']}, {search_s:.0f} s; pick trial {result['picked']['number']} "
               f"{json.dumps(result['picked']['parameters'])} weights {result['picked']['weights']}")
    print(summary)
    print(verdict)
    out = demo_dir / "search-results.md"
    out.write_text(demo.markdown_table(rows, header) + f"\n{summary}\n\n{verdict}\n")
    print(f"markdown table written to {demo.rel(out)}")


if __name__ == "__main__":
    sys.exit(main())
