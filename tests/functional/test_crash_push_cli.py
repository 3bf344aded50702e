"""Crash consistency of ``adapters push``: 100 real processes SIGKILLed at random points.

No fault-injection hook exists in the registry code; the kills are real. A driver
process (:data:`DRIVER`) imports the CLI once and warms every lazy import with one
full push, then per trial ``fork()``s a child that runs ``cli.main.main(["push",
...])`` -- the real command, exactly as the ``adapters`` script runs it -- and
SIGKILLs it after a random delay drawn from ``[0, 1.5 x a measured push]``, so kills
land everywhere: before any write, while blobs are copied, between the manifest and
the binding, inside the audit append, during ``--alias``, or after the end (some
trials finish). Forking from a warm interpreter makes a trial cost milliseconds
instead of a fresh interpreter's start-up, which keeps 100 trials well under a minute.

After every kill the driver checks, on the store as the kill left it:

* ``verify`` (every binding, alias and gate record re-hashed) is clean;
* no partial version is visible: every bound version's files are exactly one of the
  source adapters, byte for byte (the just-pushed name is also materialised, which
  re-checks each digest while copying);
* every alias points at a bound version;

and then re-runs the same push unkilled, which must exit 0 and leave the version
bound. The test finally runs ``adapters verify --all``, ``audit verify`` and ``gc``
through the CLI. Each trial pushes a new adapter (seeded), so kills hit the
fresh-write path, and re-runs exercise resuming over a dead push's leftovers
(existing blobs, an orphaned content claim).

``adapters merge`` is covered the same way by ``test_crash_merge_cli.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.crash import check_store_after_kills, run_driver

TRIALS = 100

DRIVER = textwrap.dedent(r"""
    import contextlib, io, json, random, sys, tempfile, time
    from pathlib import Path

    from cli.main import main
    from tests.support.crash import fork_main, kill_trial, open_verified, wait
    from tests.support.registry import make_adapter_dir

    root, work, trials, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)

    def argv(trial):
        args = ["push", str(work / f"a{trial}"), "--name", f"n{trial % 3}", "--store", root]
        return args + (["--alias", "candidate"] if trial % 2 else [])

    # warm every lazy import in this process, then time full pushes in forked children
    with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as scratch:
        main(["init", "--store", f"{scratch}/s"])
        make_adapter_dir(Path(scratch) / "w", seed=10**6)
        main(["push", f"{scratch}/w", "--name", "w", "--alias", "c", "--store", f"{scratch}/s"])
        timings = []
        for i in range(3):
            make_adapter_dir(Path(scratch) / f"t{i}", seed=10**6 + 1 + i)
            start = time.monotonic()
            code = wait(fork_main(["push", f"{scratch}/t{i}", "--name", "t", "--alias", "c",
                                   "--store", f"{scratch}/s"]))
            timings.append(time.monotonic() - start)
            assert code == 0, code
    window = 1.5 * max(timings)

    sources = {}
    outcomes = {"killed": 0, "finished": 0}
    failures = []
    for trial in range(trials):
        adapter = make_adapter_dir(work / f"a{trial}", seed=trial, r=2 + trial % 3)
        sources[trial] = {p.name: p.read_bytes() for p in adapter.iterdir()}
        kill_trial(argv(trial), rng.uniform(0, window), trial, outcomes, failures)

        store = open_verified(root, trial, failures)
        known = [s for s in sources.values()]
        for version in store.versions():
            files = {f["path"]: store.blobs.read(f["digest"]) for f in version.files}
            if files not in known:
                failures.append(f"trial {trial}: partial/unknown version {version.ref}")
        for name in store.names():
            for alias, digest in store.aliases(name).items():
                if not store.is_bound(name, digest):
                    failures.append(f"trial {trial}: alias {name}:{alias} dangles")
        name = f"n{trial % 3}"
        if name in store.names():
            out = work / f"m{trial}"
            store.materialize(name, out)
            if {p.name: p.read_bytes() for p in out.iterdir()} not in known:
                failures.append(f"trial {trial}: {name} materialises to unknown files")

        code = wait(fork_main(argv(trial)))  # the re-run must succeed
        if code != 0:
            failures.append(f"trial {trial}: re-run of the push exited {code}")
            continue
        latest = {f["path"]: store.blobs.read(f["digest"]) for f in store.resolve(name).files}
        if latest != sources[trial]:
            failures.append(f"trial {trial}: re-run did not bind the pushed files")
        if trial % 2 and store.aliases(name).get("candidate") != store.resolve(name).digest:
            failures.append(f"trial {trial}: re-run did not move {name}:candidate")

    print(json.dumps({"outcomes": outcomes, "failures": failures, "window": window,
                      "versions": len(store.versions())}))
""")


def test_killed_pushes_leave_a_clean_store(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert run(capsys, "init", "--store", store)[0] == 0
    work = tmp_path / "work"
    work.mkdir()
    result = run_driver(DRIVER, [store, work, TRIALS, 1234])
    assert result["failures"] == [], result["failures"][:10]
    outcomes = result["outcomes"]
    assert outcomes["killed"] + outcomes["finished"] == TRIALS
    assert outcomes["killed"] >= TRIALS // 4, outcomes  # the kills really hit running pushes
    assert result["versions"] == TRIALS  # every re-run landed, nothing extra is bound
    check_store_after_kills(capsys, store, TRIALS)  # gc removes the dead pushes' temp files
