"""Merge-search trial throughput: live LoRA swap vs reloading the base per trial.

Both loops run the same trials (each method's default merge, then seeded random
points of the search space) and score them with the same policy-derived objectives
(:class:`gate.search.scoring.Scorer`, baselines scored once, not timed):

* **live** (what ``adapters merge-search`` does): the base is loaded once
  (:class:`merging.lora.live.LiveLora`); a trial merges in memory and writes the merge into
  the base weights in place (restoring ``W0`` first), bit for bit the weights of the
  gate's candidate model;
* **naive**: a trial merges, writes the PEFT directory, and loads base + adapter
  afresh (:meth:`gate.evaluate.Evaluator.with_adapter`, i.e. what ``adapters gate``
  does for one candidate), then scores.

On CUDA both decode with CUDA graphs (:mod:`gate.graph_decoding`): the live model keeps
its captures from trial to trial, the naive loop's fresh model captures anew, as a gate
run does. Scoring is therefore timed per loop.

The two loops alternate trial by trial (live, naive, live, ...), each timed on its own,
so a load change on a shared machine hits both alike. Prints trials per minute of each,
the ratio (target >= 3x), where a trial's time goes (merge, swap, reload, scoring), and
whether the two loops' objective values are identical (they must be: same weights, same
scoring code). Models: the tiny gate world
of ``tests/support/gate.py`` (always), and SmolLM2-135M-Instruct with the demo's two
adapters when ``make demo`` has run (``.adapters-demo/work``); otherwise that part is
skipped with a note.

``--device cuda`` runs both loops on the GPU (merge, base, scoring; the naive loop's
reload is then disk -> GPU). ``--base DIR`` replaces the demo's converted SmolLM2 with
DIR; a DIR holding only ``config.json`` and the tokenizer gets seeded random weights
(:mod:`random_base`: the shapes, and so the costs, of the real model; its objective
values are noise), for a GPU machine that cannot receive the 0.5 GB checkpoint.

Usage: ``python benchmarks/bench_search.py [--trials N] [--real-trials N] [--demo-dir DIR]
[--only tiny|smollm2] [--device cpu|cuda] [--base DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


class _RandomTrial:
    """Answers ``suggest_*`` from a seeded RNG (stands in for an Optuna trial)."""

    def __init__(self, rng: random.Random, fixed: dict | None = None) -> None:
        self.rng, self.fixed = rng, fixed or {}

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return self.fixed.get(name, self.rng.uniform(low, high))

    def suggest_categorical(self, name: str, choices: list) -> object:
        return self.fixed.get(name, self.rng.choice(choices))


def choices(space, count: int) -> list:
    rng = random.Random(0)
    picked = [space.suggest(_RandomTrial(rng, d)) for d in space.defaults()]
    while len(picked) < count:
        picked.append(space.suggest(_RandomTrial(rng)))
    return picked[:count]


def bench(label: str, base: Path, adapter_dirs: list[Path], names: list[str], policy_path: Path,
          methods: list[str], count: int, device: str = "cpu") -> float:
    """Time both loops on one model; returns the speed-up."""
    from gate.evaluate import Evaluator
    from gate.policy import load_policy
    from gate.search.scoring import Scorer
    from gate.search.space import build_space
    from merging.adapter import load_adapter
    from merging.lora.engine import merge_adapters
    from merging.lora.live import LiveLora, rank_bound
    from merging.lora.peft_output import write_peft_dir

    policy = load_policy(policy_path)
    adapters = [load_adapter(d) for d in adapter_dirs]
    trials = choices(build_space(len(adapters), methods), count)

    def make_ev() -> Evaluator:
        return Evaluator(base, dtype=policy.dtype, seed=policy.seed, max_length=policy.max_length,
                         device=device)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ev = make_ev()
        live = LiveLora.attach(ev.base(), rank_bound(adapters))
        scorer = Scorer(policy, ev, live, list(zip(names, adapters, strict=True)), store=None, name="bench",
                        base_dir=base, workdir=Path(tmp))
        setup = time.perf_counter() - start
        scorer.prepare()
        for method in dict.fromkeys(c.method for c in trials):  # warm-up, untimed: first-call
            merge_adapters(adapters, [1.0] * len(adapters), method, device=device)  # hit neither loop
        fast, slow, parts = [], [], dict.fromkeys(("merge", "swap", "score", "naive score", "reload"), 0.0)
        fast_s, slow_s = setup, 0.0  # the one base load counts
        for i, c in enumerate(trials):
            t0 = time.perf_counter()
            result = merge_adapters(adapters, list(c.weights), c.method, params=dict(c.params),
                                    device=device)
            t1 = time.perf_counter()
            live.load(result, adapters)
            t2 = time.perf_counter()
            fast.append(scorer.score(result).values)
            t3 = time.perf_counter()
            result = merge_adapters(adapters, list(c.weights), c.method, params=dict(c.params),
                                    device=device)
            t4 = time.perf_counter()
            out = write_peft_dir(result, Path(tmp) / f"trial-{i}")
            model = make_ev().with_adapter("candidate", out)
            scorer.live = SimpleNamespace(model=model)
            t5 = time.perf_counter()
            slow.append(scorer.score(result).values)
            scorer.live, model = live, None  # the naive model is dropped, as a gate run ends
            t6 = time.perf_counter()
            fast_s, slow_s = fast_s + t3 - t0, slow_s + t6 - t3
            for key, spent in (("merge", t1 - t0 + t4 - t3), ("swap", t2 - t1),
                               ("score", t3 - t2), ("naive score", t6 - t5), ("reload", t5 - t4)):
                parts[key] += spent
    same = fast == slow
    ratio = slow_s / fast_s
    print(f"{label} on {device}: {count} trials  live {60 * count / fast_s:.1f} trials/min ({fast_s:.1f} s, "
          f"base loaded once in {setup:.1f} s)  naive {60 * count / slow_s:.1f} trials/min "
          f"({slow_s:.1f} s)  ratio {ratio:.2f}x  objectives identical: {'yes' if same else 'NO'}\n"
          f"  per trial: merge {parts['merge'] / 2 / count:.3f} s (both loops), in-place swap "
          f"{parts['swap'] / count:.3f} s (live), write + reload {parts['reload'] / count:.3f} s "
          f"(naive), scoring {parts['score'] / count:.3f} s (live) and {parts['naive score'] / count:.3f} s "
          f"(naive: on CUDA it captures its decoding graphs anew for each model)", flush=True)
    return ratio


def tiny(count: int, device: str = "cpu") -> float:
    from tests.support.gate import world, write_policy

    w = world()
    with tempfile.TemporaryDirectory() as tmp:
        policy = write_policy(Path(tmp) / "gate.yaml", w, merge_equivalence=None)
        return bench("tiny Llama (gate world)", w.base, [w.adapter_a, w.adapter_b],
                     ["adapter-a", "adapter-b"], policy, ["ties", "dare_ties", "breadcrumbs_ties"],
                     count, device)


def smollm2(demo_dir: Path, count: int, device: str = "cpu", base_dir: Path | None = None) -> float | None:
    work = demo_dir / "work"
    if base_dir is not None:
        from random_base import has_weights, materialize

        if not has_weights(base_dir):
            print(f"SmolLM2-135M: {rel(base_dir)} has no weights, so seeded random ones of its config "
                  "(timings only: the objective values are noise)", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-search-base-") as tmp:
            return _smollm2_on(work, materialize(base_dir, Path(tmp) / "base"), count, device)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import smollm2

        smollm2.find_gguf()
        base = smollm2.convert(work, log=lambda *_: None) if (work / "base").is_dir() else work / "base"
    except (ImportError, FileNotFoundError) as err:
        print(f"SmolLM2-135M: skipped ({err})")
        return None
    return _smollm2_on(work, base, count, device)


def _smollm2_on(work: Path, base: Path, count: int, device: str) -> float | None:
    adapters = sorted((work / "adapters").glob("*-*")) if (work / "adapters").is_dir() else []
    policy = work / "gate-policy.yaml"
    found = {t: next((a for a in adapters if a.name.startswith(t + "-")
                      and (a / "adapter_config.json").is_file()), None) for t in ("reverse", "arithmetic")}
    if not (base / "config.json").is_file() or not policy.is_file() or None in found.values():
        print(f"SmolLM2-135M: skipped (run `make demo` first: needs {rel(base)}, the two trained "
              f"adapters and {rel(policy)})")
        return None
    return bench("SmolLM2-135M-Instruct (demo adapters)", base, [found["reverse"], found["arithmetic"]],
                 ["smollm2-reverse", "smollm2-arith"], policy, ["ties", "dare_ties", "breadcrumbs_ties"],
                 count, device)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--real-trials", type=int, default=3)
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".adapters-demo")
    parser.add_argument("--only", choices=("tiny", "smollm2"), help="run one model's benchmark")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both loops run")
    parser.add_argument("--base", type=Path, default=None,
                        help="SmolLM2 model dir to use instead of the demo's (config + tokenizer only: "
                             "seeded random weights)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: skipped (run with --device cpu)")
            return 0
    ratios = {"tiny": None if args.only == "smollm2" else tiny(args.trials, args.device),
              "smollm2": None if args.only == "tiny" else smollm2(args.demo_dir, args.real_trials,
                                                                  args.device, args.base)}
    print(json.dumps({k: None if v is None else round(v, 2) for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
