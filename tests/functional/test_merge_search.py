"""``adapters merge-search`` on the gate world (tests/support/gate.py: two trained tiny
LoRAs): the pick passes the policy and is pushed as a merge whose lineage records the
search; the same seed gives the same pick and version; two worker processes share one
SQLite study; a killed worker's trial is failed by the heartbeat and the study goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from gate.checks import num
from tests.support.cli import run_json
from tests.support.gate import build_store, world, write_policy

ROOT = Path(__file__).resolve().parents[2]
METHODS = "ties,dare_ties,breadcrumbs_ties"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    w = world()
    root = tmp_path_factory.mktemp("search")
    store, _ = build_store(root / "store", w)
    policy = write_policy(root / "gate.yaml", w, merge_equivalence=None)
    return w, store, policy, root


def _args(setup, *extra: str) -> list[str]:
    w, store, policy, _ = setup
    return ["merge-search", "adapter-a", "adapter-b", "--base", str(w.base), "--policy", str(policy),
            "--methods", METHODS, "--store", str(store.root), *extra]


def test_pick_passes_and_is_pushed_with_the_search_in_its_lineage(setup, capsys):
    w, store, policy, _ = setup
    png = setup[3] / "front.png"
    code, data = run_json(capsys, *_args(setup, "--trials", "5", "--name", "searched",
                                         "--plot", str(png)))
    assert code == 0, data
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the search still succeeds, and says why there is no picture
        assert data["plot"] is None and not png.exists()
        assert "matplotlib is not installed; no plot written (pip install matplotlib)" in data["notes"]
    else:
        assert data["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert len(data["trials"]) == 5 and data["complete"]
    feasible = [t for t in data["trials"] if t["feasible"]]
    picked = data["picked"]
    assert picked["feasible"]
    worst = lambda t: min(v for k, v in t["values"].items() if k.startswith("retention:"))  # noqa: E731
    assert worst(picked) == max(worst(t) for t in feasible)
    assert picked["number"] in data["front"]
    version = store.resolve(data["pushed"]["version"]["ref"])
    lineage = version.lineage
    assert lineage["recipe"]["method"] == picked["method"]
    assert [p["weight"] for p in lineage["parents"]] == picked["weights"]
    search = lineage["report"]["search"]
    assert search["trials"] == 5 and search["trial"] == picked["number"]
    assert search["sampler"] == "tpe" and search["seed"] == 0 and search["optuna_version"]
    with store.open_blob(search["trials_digest"]) as handle:
        blob = json.loads(handle.read())
    assert [t["number"] for t in blob["trials"]] == [t["number"] for t in data["trials"]]
    assert all(set(t["values"]) == {"perplexity:perplexity", "retention:adapter-a",
                                    "retention:adapter-b"} for t in blob["trials"])
    # the first trials are the enqueued hand-made merges (defaults)
    assert [t["method"] for t in data["trials"][:3]] == METHODS.split(",")
    # a normal merge version: the real gate can judge it (and records its verdict), and
    # its numbers are the search's (the live model is bit-identical to the gate's)
    code, gate = run_json(capsys, "gate", version.ref, "--base", str(w.base), "--policy",
                          str(policy), "--store", str(store.root))
    assert code == 0
    metrics = {c["name"]: c["metrics"] for c in gate["checks"]}
    values = picked["values"]
    assert num(values["perplexity:perplexity"]) == metrics["perplexity"]["perplexity"]
    assert num(data["baselines"]["perplexity:baseline"]) == metrics["perplexity"]["baseline_perplexity"]
    for name in ("adapter-a", "adapter-b"):
        assert num(values[f"retention:{name}"]) == metrics["retention"][f"{name}.ratio"]
        assert num(data["baselines"][f"retention:{name}"]) == metrics["retention"][f"{name}.baseline"]
    assert store.gate_record(version.digest, _policy_digest(policy))["passed"] is True


def _policy_digest(policy: Path) -> str:
    from gate.policy import load_policy

    return load_policy(policy).digest


def test_same_seed_same_pick_and_version(setup):
    from gate.search.run import SearchSettings, run_search

    w, store, policy, _ = setup
    settings = SearchSettings(methods=METHODS.split(","), trials=4, seed=3, name="repro")
    first = run_search(store, ["adapter-a", "adapter-b"], w.base, policy, settings)
    second = run_search(store, ["adapter-a", "adapter-b"], w.base, policy, settings)
    assert [r.to_json() for r in first.rows] == [r.to_json() for r in second.rows]
    assert first.picked is not None and first.picked.number == second.picked.number
    assert first.pushed.version.digest == second.pushed.version.digest
    assert second.pushed.created is False



def test_a_worker_joining_a_full_study_pushes_the_same_version(setup, tmp_path):
    """A worker that finds the study's budget spent loads no model and scores nothing,
    yet pushes the same pick as the worker that ran the trials: same baselines in the
    trials blob, so the same version digest (deduplicated, not a second version)."""
    from gate.search.run import SearchSettings, run_search

    w, store, policy, _ = setup
    settings = SearchSettings(methods=METHODS.split(","), trials=3, seed=5, name="joined",
                              storage=f"sqlite:///{tmp_path / 'study.db'}", study="full")
    first = run_search(store, ["adapter-a", "adapter-b"], w.base, policy, settings)
    second = run_search(store, ["adapter-a", "adapter-b"], w.base, policy, settings)
    assert first.evaluated == 3 and second.evaluated == 0
    with store.open_blob(first.pushed.version.lineage["report"]["search"]["trials_digest"]) as blob:
        baselines = json.load(blob)["baselines"]
    assert baselines and all(v is not None for v in baselines.values())
    assert second.pushed.version.digest == first.pushed.version.digest
    assert second.pushed.created is False

def _worker(setup, storage: str, study: str, trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPTERS_ACTOR": "test"}
    code = "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *_args(
        setup, "--trials", str(trials), "--storage", storage, "--study", study, "--json", *extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _trials(storage: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_two_workers_share_one_sqlite_study(setup, tmp_path):
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    workers = [_worker(setup, storage, "shared", 8) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for proc, (_out, err) in zip(workers, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    docs = [json.loads(out) for out, _ in outputs]
    trials = _trials(storage, "shared")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8
    assert sum(d["evaluated_here"] for d in docs) == 8          # every trial evaluated once
    params = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(params)) == len(params)                      # no duplicate proposals
    assert {t.number for t in complete} == set(range(len(trials))) - {
        t.number for t in trials if t.state != TrialState.COMPLETE}


def _running_with_heartbeat(db: Path) -> int | None:
    """A RUNNING trial that has recorded a heartbeat (Optuna's schema), if any.

    Optuna fails a stale trial only once it has a heartbeat: a worker killed between
    taking a trial and its first heartbeat (milliseconds) leaves it RUNNING.
    """
    import sqlite3

    if not db.exists():
        return None
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute("SELECT t.number FROM trials t JOIN trial_heartbeats h "
                               "ON h.trial_id = t.trial_id WHERE t.state = 'RUNNING'").fetchone()
    except sqlite3.Error:  # tables not created yet
        return None
    return None if row is None else int(row[0])


def test_killed_worker_trial_is_failed_and_the_study_continues(setup, tmp_path):
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    victim = _worker(setup, storage, "killed", 6, "--heartbeat", "1", "--no-push")
    deadline = time.monotonic() + 240
    running = None
    while running is None and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
        running = _running_with_heartbeat(tmp_path / "study.db")
    assert running is not None, "the worker never ran a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(2.5)  # past the grace period (2 x heartbeat)
    survivor = _worker(setup, storage, "killed", 6, "--heartbeat", "1")
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    trials = {t.number: t for t in _trials(storage, "killed")}
    assert trials[running].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 6
    # the killed trial ran again with its parameters (the first trial: a method's default)
    killed = trials[running]
    expected = {**killed.system_attrs.get("fixed_params", {}), **killed.params}
    assert expected, "the killed trial had no parameters yet"
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == running]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert {k: retried[0].params[k] for k in expected} == expected
    doc = json.loads(out)
    assert doc["complete"] and doc["pushed"] is not None


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_retried(setup, tmp_path):
    # found by a QA pass: a worker killed between Optuna marking a trial RUNNING and its first
    # heartbeat left a trial nothing ever failed; every rerun then said "19 of 20 trials"
    import optuna
    from optuna.trial import TrialState

    from gate.search.study import open_storage

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = _worker(setup, storage, "orphan", 2, "--heartbeat", "1", "--no-push")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    study = optuna.load_study(study_name="orphan", storage=open_storage(storage, 1))
    orphan = study.ask()  # RUNNING; no heartbeat is ever recorded for it
    time.sleep(2.5)  # past the grace period (2 x heartbeat), with no heartbeat ever
    survivor = _worker(setup, storage, "orphan", 3, "--heartbeat", "1")
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    trials = {t.number: t for t in _trials(storage, "orphan")}
    assert trials[orphan.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 3
    assert json.loads(out)["pushed"] is not None
    assert "FutureWarning" not in err and "deprecated" not in err


def test_a_smaller_budget_on_a_saved_study_uses_its_first_trials(setup, tmp_path, capsys):
    # found by a QA pass: rejoining a 4-trial study with --trials 2 picked among all 4
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ("--storage", storage, "--study", "budget", "--no-push")
    code, big = run_json(capsys, *_args(setup, "--trials", "4", *common))
    assert code == 0 and len(big["trials"]) == 4
    code, small = run_json(capsys, *_args(setup, "--trials", "2", *common))
    assert code == 0 and [t["number"] for t in small["trials"]] == [0, 1]
    assert small["picked"]["number"] in (0, 1)
    assert any("2 more complete trials than --trials 2" in n for n in small["notes"])
    code, fresh = run_json(capsys, *_args(setup, "--trials", "2", "--no-push"))
    assert code == 0 and fresh["picked"]["parameters"] == small["picked"]["parameters"]


def test_no_passing_trial_exits_1_and_pushes_nothing(setup, tmp_path, capsys):
    w, store, _, _ = setup
    policy = write_policy(tmp_path / "gate.yaml", w, merge_equivalence=None, perplexity={
        "kind": "perplexity", "data": f"data/{w.heldout.name}", "max": 1.0})  # unreachable
    code, data = run_json(capsys, "merge-search", "adapter-a", "adapter-b", "--base", str(w.base),
                          "--policy", str(policy), "--methods", "ties", "--trials", "2",
                          "--name", "never", "--store", str(store.root))
    assert code == 1 and data["picked"] is None and data["pushed"] is None
    assert not any(t["feasible"] for t in data["trials"]) and data["front"]
    # found by a QA pass: the failing document lacked the error fields of every other failure
    assert data["exit_code"] == 1 and data["error"] == "GateFailedError" and data["fix"]
    assert "no trial of 2 passes" in data["message"]
    assert "never" not in store.names()


def test_a_merge_refused_for_its_values_is_a_refused_trial_not_a_crash(setup, tmp_path, capsys):
    """A lambda in range for the space's checks but so large that the merged delta overflows
    float32: the engine refuses that merge; the search scores the trial as refused and goes on."""
    w, store, policy, _ = setup
    space = tmp_path / "space.yaml"
    space.write_text("lambda: [1.0e+38, 3.0e+38]\n")
    code, data = run_json(capsys, "merge-search", "adapter-a", "adapter-b", "--base", str(w.base),
                          "--policy", str(policy), "--methods", "ties", "--space", str(space),
                          "--trials", "2", "--name", "overflowing", "--store", str(store.root))
    assert code == 1 and data["picked"] is None and data["pushed"] is None
    assert len(data["trials"]) == 2 and data["complete"]
    refused = [t for t in data["trials"] if t["refused"]]
    assert refused and not any(t["feasible"] for t in data["trials"])
    for trial in refused:
        assert "float32" in trial["refused"] and "lambda" in trial["refused"]
        assert all(v == 0.0 for k, v in trial["values"].items() if k.startswith("retention:"))
    assert "overflowing" not in store.names()
    code = main(["merge-search", "adapter-a", "adapter-b", "--base", str(w.base), "--policy", str(policy),
                 "--methods", "ties", "--space", str(space), "--trials", "1", "--no-push",
                 "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 1 and "refused" in err and "float32" in err


def test_a_space_beyond_float32_is_refused_without_a_traceback(setup, tmp_path, capsys):
    w, store, policy, _ = setup
    space = tmp_path / "space.yaml"
    space.write_text("methods: [task_arithmetic]\nlambda: 1.0e+39\n")
    code = main(["merge-search", "adapter-a", "adapter-b", "--base", str(w.base), "--policy", str(policy),
                 "--space", str(space), "--trials", "2", "--no-push", "--store", str(store.root)])
    err = capsys.readouterr().err
    # a lambda beyond float32 cannot scale anything: the space itself is refused, up front
    assert code == 2 and "does not fit float32" in err and err.count("error:") == 1
    assert "Traceback" not in err and "past_key_values" not in err


def test_a_study_made_for_another_search_is_not_joined(setup, tmp_path, capsys):
    # found by a QA pass: joining --study with another policy or other inputs reused trials
    # scored for the first search and pushed a pick that failed the real gate
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(_args(setup, "--trials", "2", "--storage", storage, "--study", "one",
                      "--no-push", "--json")) in (0, 1)
    capsys.readouterr()
    before = len(_trials(storage, "one"))
    code = main(_args(setup, "--trials", "2", "--storage", storage, "--study", "one", "--seed", "7",
                      "--no-push", "--json"))
    out = json.loads(capsys.readouterr().out)
    assert code == 4 and "made for another search" in out["message"]
    assert len(_trials(storage, "one")) == before  # nothing was added to it


def test_a_study_name_with_markup_is_shown_as_text(setup, tmp_path, capsys):
    # found by a QA pass: --study '[/x]' crashed the table (exit 70) after the push
    code = main(_args(setup, "--trials", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}",
                      "--study", "[/x]", "--no-push"))
    out = capsys.readouterr().out
    assert code in (0, 1) and "Pareto front of [/x]" in " ".join(out.split())


def test_a_read_only_study_storage_exits_6(setup, tmp_path, capsys):
    import sqlite3

    db = tmp_path / "ro.db"
    sqlite3.connect(db).close()  # an empty database: no schema, and read-only below
    for study in (None, "x"):  # the schema cannot be created
        extra = ["--study", study] if study else []
        code = main(_args(setup, "--trials", "1", "--storage", f"sqlite:///file:{db}?mode=ro&uri=true",
                          *extra, "--no-push", "--json"))
        out = json.loads(capsys.readouterr().out)
        assert code == 6 and out["error"] == "EnvironmentFailure", out
    code = main(_args(setup, "--trials", "1", "--storage", f"sqlite:///{tmp_path}/no-such-dir/s.db",
                      "--no-push", "--json"))
    assert code == 6 and json.loads(capsys.readouterr().out)["error"] == "EnvironmentFailure"


def test_a_pick_rule_naming_no_set_is_refused_before_the_search(setup, capsys):
    # found by a QA pass: `--pick retention:nosuchset` failed only after every trial had run
    code = main(_args(setup, "--trials", "50", "--pick", "retention:nosuchset", "--no-push", "--json"))
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "no retention set 'nosuchset'" in out["message"]
    assert "retention:adapter-a" in out["fix"]


def test_two_retention_checks_on_one_set_are_refused(setup, tmp_path, capsys):
    # found by a QA pass: objectives were named retention:<set> whatever the check, so a
    # second check over the same sets overwrote the first's values (exact match never optimised)
    import yaml

    w, store, _, _ = setup
    policy = write_policy(tmp_path / "gate.yaml", w, merge_equivalence=None)
    doc = yaml.safe_load(policy.read_text())
    retention = next(c for c in doc["checks"] if c["kind"] == "retention")
    doc["checks"].append({**retention, "name": "loglik", "metric": "loglik", "min_ratio": 0.5})
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    code = main(["merge-search", "adapter-a", "adapter-b", "--base", str(w.base), "--policy", str(policy),
                 "--methods", "ties", "--trials", "1", "--no-push", "--store", str(store.root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "scored by two checks (retention, loglik)" in out["message"], out
    assert "one retention check per set" in out["fix"]


def test_a_base_that_is_not_the_inputs_base_is_refused_before_the_search(setup, tmp_path, capsys):
    # found by a QA pass: a search on another checkpoint of the same shape scored every trial
    # on it and pushed a pick that the gate then failed on its base fingerprint
    from tests.support.gate import build_base

    w, store, policy, _ = setup
    other = tmp_path / "other-base"
    build_base(other, seed=7)
    for extra, expected in (((), "other weights"), (("--allow-base-mismatch",), None)):
        code = main(["merge-search", "adapter-a", "adapter-b", "--base", str(other), "--policy", str(policy),
                     "--methods", "ties", "--trials", "1", "--no-push", "--store", str(store.root),
                     "--json", *extra])
        out = json.loads(capsys.readouterr().out)
        if expected:
            assert code == 2 and expected in out["message"] and out["error"] == "BaseMismatchError", out
            assert "--allow-base-mismatch" in out["fix"]
        else:
            assert code in (0, 1), out  # allowed: the search runs (its verdicts are the user's risk)


@pytest.mark.parametrize(("space_text", "pick", "message"), [
    ("density: " + "1" + "0" * 400 + "\n", None, "space field density must be [low, high]"),
    ("density: [0.1\n", None, "search space"),
    (None, "trial:\u00b2", "unknown --pick rule"),
])
def test_hostile_space_and_pick_values_are_exit_2_with_a_fix(setup, tmp_path, capsys, space_text, pick,
                                                             message):
    # found by a QA pass: a 400-digit YAML integer (OverflowError) and `--pick trial:²` (a
    # digit int() refuses, after every trial had run) were internal errors, and a space file
    # that does not parse had no fix line
    extra = ["--pick", pick] if pick else []
    if space_text is not None:
        (tmp_path / "space.yaml").write_text(space_text)
        extra += ["--space", str(tmp_path / "space.yaml")]
    code = main(_args(setup, "--trials", "2", "--no-push", "--json", *extra))
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and message in out["message"] and out["fix"], out
