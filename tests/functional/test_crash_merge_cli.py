"""Crash consistency of ``adapters merge``: real processes SIGKILLed at random points.

The companion of ``test_crash_push_cli.py`` (100 push trials), built the same way:
no fault-injection hook, a driver process (:data:`DRIVER`) that imports the CLI and
torch once, warms every lazy import with one full merge, then per trial ``fork()``s
a child running ``cli.main.main(["merge", ...])`` -- the real command -- and
SIGKILLs it after a random delay in ``[0, 1.5 x a measured merge]`` (the median of
three). A kill lands while inputs are materialized into the store's ``tmp/``, during
the merge, while the merged directory is written, during ingest, inside the push
(blobs, manifest, binding, audit), while ``--out`` is written, or after the end
(``outcomes`` counts kills before and after the binding). torch runs
single-threaded (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) so no thread
pool is live across ``fork()``.

Each trial merges a different pair of four tiny stored adapters with a rotating
method and its own seed into one of three names, so every complete merge is a new
version; a third of the trials also pass ``--out``. After every kill the driver
checks, on the store as the kill left it:

* ``verify`` is clean;
* no partial version is visible: every bound merge version is the complete result
  of some trial (its digest is the one an unkilled re-run of that trial binds), it
  materializes (each file re-checked against its digest) and the merged adapter
  loads with :func:`merging.adapter.load_adapter`, and its lineage parents are
  stored inputs;
* no temp directory shows as a name or version: ``names/`` holds only the pushed
  and merged names, ``versions/`` only 64-hex bindings;
* ``--out`` is absent or complete (both files, loads).

Then it re-runs the same merge unkilled (``--out`` into a fresh directory:
``--out`` refuses a non-empty one by design), which must exit 0 and bind a
version. The test finally runs ``verify --all``, ``audit verify`` and ``gc`` through
the CLI; gc removes the dead merges' work directories from ``tmp/``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.crash import check_store_after_kills, run_driver
from tests.support.registry import child_env

TRIALS = 60
INPUTS = 4
MERGE_NAMES = 3

DRIVER = textwrap.dedent(r"""
    import contextlib, io, json, random, re, signal, sys, tempfile, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)  # no intra-op pool alive across fork()

    from cli.main import main
    from merging.adapter import load_adapter
    from registry.storage.store import Store
    from tests.support.crash import fork_main, kill_trial, open_verified, wait
    from tests.support.registry import make_adapter_dir

    root, work = sys.argv[1], Path(sys.argv[2])
    trials, inputs, merge_names, seed = (int(a) for a in sys.argv[3:7])
    rng = random.Random(seed)
    METHODS = ("linear", "ties", "dare_ties", "cat", "magnitude_prune", "task_arithmetic",
               "dare_linear")
    HEX = re.compile(r"^[0-9a-f]{64}$")

    def merge_argv(trial, store, out=None):
        i, j = rng_pairs[trial]
        args = ["merge", f"in{i}", f"in{j}", "--method", METHODS[trial % len(METHODS)],
                "--seed", str(trial), "--name", f"m{trial % merge_names}", "--store", store]
        return args + (["--out", str(out)] if out is not None else [])

    # the inputs (pushed in this process, which also warms push's imports)
    for i in range(inputs):
        adapter = make_adapter_dir(work / f"in{i}", seed=i, r=2 + i % 3, hidden=16, layers=2)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["push", str(adapter), "--name", f"in{i}", "--store", root]) == 0
    pairs = [(i, j) for i in range(inputs) for j in range(inputs) if i != j]
    rng_pairs = [rng.choice(pairs) for _ in range(trials)]

    # warm every lazy import (torch ops included) here, then time merges in forked children
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(merge_argv(0, root, work / "warm-out") + ["--name", "warm"]) == 0
    timings = []
    for t in range(3):
        start = time.monotonic()
        code = wait(fork_main(merge_argv(t, root) + ["--name", "warm"]))
        timings.append(time.monotonic() - start)
        assert code == 0, code
    window = 1.5 * sorted(timings)[1]  # the median: the first forked merge runs slow
    store = Store.open(root)
    for version in store.versions("warm"):  # unbound again: their blobs are gc's
        store.delete_version(version.ref)
    input_digests = {store.resolve(f"in{i}").digest for i in range(inputs)}
    expected_names = ({f"in{i}" for i in range(inputs)} | {f"m{k}" for k in range(merge_names)}
                      | {"warm"})

    def merged_versions():
        return [v for v in store.versions() if v.name.startswith("m")]

    completed = set()  # digests bound by unkilled re-runs of earlier trials
    checked = set()
    outcomes = {"killed": 0, "finished": 0, "killed_after_binding": 0}
    failures = []
    for trial in range(trials):
        out = work / f"o{trial}" if trial % 3 == 0 else None
        code_killed = kill_trial(merge_argv(trial, root, out), rng.uniform(0, window), trial,
                                 outcomes, failures)

        store = open_verified(root, trial, failures)
        names_dir = Path(root) / "names"
        if {p.name for p in names_dir.iterdir()} - expected_names:
            failures.append(f"trial {trial}: unexpected entries in names/: "
                            f"{sorted(p.name for p in names_dir.iterdir())}")
        for binding in names_dir.glob("*/versions/*"):
            if not HEX.match(binding.name):
                failures.append(f"trial {trial}: {binding} shows as a version")
        after_kill = set()
        for version in merged_versions():
            after_kill.add(version.digest)
            if version.digest in checked:
                continue
            parents = {p["digest"] for p in (version.lineage or {}).get("parents", [])}
            if len(parents) != 2 or not parents <= input_digests:
                failures.append(f"trial {trial}: {version.ref} has parents {parents}")
            dest = work / f"check-{version.short}"
            try:
                load_adapter(store.materialize(version, dest)).close()
            except Exception as exc:  # noqa: BLE001 -- any failure is a partial version
                failures.append(f"trial {trial}: {version.ref} does not load: {exc!r}")
            checked.add(version.digest)
        if out is not None and out.exists():
            try:
                assert sorted(p.name for p in out.iterdir()) == [
                    "adapter_config.json", "adapter_model.safetensors"]
                load_adapter(out).close()
            except Exception as exc:  # noqa: BLE001
                failures.append(f"trial {trial}: --out {out} is partial: {exc!r}")

        rerun_out = work / f"o{trial}-rerun" if out is not None else None
        code = wait(fork_main(merge_argv(trial, root, rerun_out)))  # the re-run must succeed
        if code != 0:
            failures.append(f"trial {trial}: re-run of the merge exited {code}")
            continue
        digest = Store.open(root).resolve(f"m{trial % merge_names}").digest
        unexplained = after_kill - completed - {digest}
        if unexplained:
            failures.append(f"trial {trial}: versions bound by no complete merge: {unexplained}")
        completed.add(digest)
        if code_killed == -signal.SIGKILL and digest in after_kill:
            outcomes["killed_after_binding"] += 1
        if rerun_out is not None:
            load_adapter(rerun_out).close()  # raises (the driver fails) when not written

    print(json.dumps({"outcomes": outcomes, "failures": failures, "window": window,
                      "completed": len(completed), "versions": len(merged_versions())}))
""")


def test_killed_merges_leave_a_clean_store(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert run(capsys, "init", "--store", store)[0] == 0
    work = tmp_path / "work"
    work.mkdir()
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = run_driver(DRIVER, [store, work, TRIALS, INPUTS, MERGE_NAMES, 4321], env=env)
    assert result["failures"] == [], result["failures"][:10]
    outcomes = result["outcomes"]
    assert outcomes["killed"] + outcomes["finished"] == TRIALS
    assert outcomes["killed"] >= TRIALS // 4, result  # the kills really hit running merges
    assert result["versions"] == result["completed"] == TRIALS  # each trial: one new version
    # gc removes the dead merges' work directories from tmp/
    check_store_after_kills(capsys, store, INPUTS + TRIALS)
