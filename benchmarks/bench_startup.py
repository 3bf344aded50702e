"""Start-up time of ``adapters --help`` and ``adapters ls`` (target: < 0.3 s each).

Each command runs N times as a fresh subprocess (``python -m cli.main ...``, which
is what the ``adapters`` console script runs); the median wall time is reported
next to a bare ``python -c pass`` anchor measured in the same run, so numbers from
different machines can be compared by their ratio to the anchor. ``adapters ls``
runs against a freshly initialised temporary store with one pushed adapter.

A second check imports ``cli.main`` and runs ``ls`` in one interpreter and lists
which of torch/transformers/peft got imported (must be none).

Usage::

    python benchmarks/bench_startup.py [--runs 15] [--target 0.3] [--json] [--check]

``--check`` exits 1 when a median misses the target or a heavy module was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def time_command(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall times (seconds) of ``runs`` fresh runs of ``argv`` (after one warm-up run)."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
        if i:  # the first run warms the page cache and .pyc files
            times.append(elapsed)
    return times


def prepare_store(store: Path, env: dict[str, str]) -> None:
    """Initialise ``store`` and push one tiny synthetic adapter so ``ls`` has rows."""
    sys.path.insert(0, str(ROOT))
    from tests.support.cli import write_synthetic_adapter

    adapter = write_synthetic_adapter(store.parent / "adapter")
    cli = [sys.executable, "-m", "cli.main"]
    for args in (["init"], ["push", str(adapter), "--name", "bench", "--alias", "candidate"]):
        subprocess.run(cli + args + ["--store", str(store)], cwd=ROOT, env=env, check=True,
                       capture_output=True)


def heavy_imports(store: Path, env: dict[str, str]) -> list[str]:
    """Heavy modules present after ``import cli.main`` and an in-process ``ls``."""
    code = (
        "import json, sys\nfrom cli.main import main\n"
        f"main(['ls', '--store', {str(store)!r}])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--target", type=float, default=0.3, help="seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when over target")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        store = Path(tmp) / "store"
        prepare_store(store, env)
        cli = [sys.executable, "-m", "cli.main"]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "adapters --help": cli + ["--help"],
            "adapters ls": cli + ["ls", "--store", str(store)],
        }
        medians = {label: statistics.median(time_command(argv, args.runs, env))
                   for label, argv in commands.items()}
        heavy = heavy_imports(store, env)

    anchor = medians["python -c pass"]
    results = {
        "runs": args.runs,
        "target_s": args.target,
        "python": sys.version.split()[0],
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_anchor": {k: round(v / anchor, 2) for k, v in medians.items()},
        "over_anchor_s": {k: round(v - anchor, 4) for k, v in medians.items()},
        "heavy_modules_imported": heavy,
    }
    failed = heavy or any(v > args.target for k, v in medians.items() if k.startswith("adapters"))
    results["ok"] = not failed
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"start-up, median of {args.runs} runs (target < {args.target:.2f} s)")
        for label, median in medians.items():
            print(f"  {label:<16} {median * 1000:7.1f} ms   x{median / anchor:5.1f} of anchor"
                  f"   (+{(median - anchor) * 1000:6.1f} ms)")
        print(f"  heavy modules imported by ls: {', '.join(heavy) or 'none'}")
        print("  OK" if not failed else "  OVER TARGET")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
