"""Crash at every named failpoint of every mutation, on every backend (etcd/gofail style).

Each case builds a store, runs one real command in a child process with
``ADAPTERS_FAILPOINT=<point>`` (the child SIGKILLs itself there, see
:mod:`registry.storage.failpoints`): a fork of the test process running the CLI's ``main`` (or
the library call the CLI would make), so no case pays for an interpreter start-up; a
merge, which runs torch, gets a fresh ``python`` process. Then it checks, with its own
reading of the log rather than only ``verify``:

* the store verifies (``verify`` with its audit cross-check) and the audit chain is linear;
* every visible version is explained by exactly one effective ``push`` entry, and
  the crashed operation's change is either visible with exactly one effective entry or
  invisible (its entry, if logged, pending or rolled back);
* the next command works, and once the dead writer's intent is settled (at once on a
  local store; after ``$ADAPTERS_RECOVER_AFTER`` on S3) no marker is left and every
  rolled-back entry is rolled back exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.main import main
from registry.audit.index import cross_check
from registry.digests import canonical_json, sha256_digest
from registry.errors import NotFoundError
from registry.storage.failpoints import ENV_VAR, OPERATIONS, STEPS
from registry.audit.journal import pending_intents
from registry.maintenance.integrity import verify
from registry.storage.store import Store
from tests.plugins.s3 import backend_kind, environment
from tests.support.registry import PYTHON, REPO_ROOT, make_adapter_dir, push_adapter

# the policy the store pins: stored as the blob a gate run stores (promote reads it back)
POLICY_BYTES = canonical_json({"policy": {"version": 1, "checks": []}, "data": {}})
POLICY = sha256_digest(POLICY_BYTES)


def _gate(location: str, ref: str) -> int:
    # the store call `adapters gate` makes (the CLI's gate would need a model)
    store = Store.open(location)
    version = store.resolve(ref)
    policy = "sha256:" + "9" * 64
    store.put_gate_record(version.digest, policy, {"passed": True, "checks": [],
                                                   "candidate_digest": version.digest,
                                                   "policy_digest": policy})
    return 0


def _delete(location: str, ref: str) -> int:
    try:  # the library call (the CLI has no command that unbinds)
        Store.open(location).delete_version(ref)
    except NotFoundError:  # the crashed run got as far as unbinding it
        pass
    return 0


def _sign(location: str, ref: str, key: Path) -> int:
    from registry.signing import generate_key, sign_version

    store = Store.open(location)
    version = store.resolve(ref)
    if not key.exists():
        generate_key(key, key.with_suffix(".pub"))
    store.add_signature(version, sign_version(version.name, version.digest, key))
    return 0


@dataclass
class Case:
    """A store prepared for one crashing command."""

    location: str
    store: Store
    work: Path
    first: str   # ref of lora-a's first version
    second: str  # ref of lora-a's second version

    def command(self, op: str) -> Callable[[], int]:
        """What the child process runs for operation ``op`` (the real CLI where it has one)."""
        loc = self.location
        cli = {
            "push": ["push", str(self.work / "c"), "--name", "lora-c"],
            "alias": ["alias", "set", "lora-a:candidate", self.second],
            "promote": ["promote", self.second, "--to", "release"],
            "gc": ["gc", "--grace", "0s"],
        }
        if op in cli:
            return lambda: main([*cli[op], "--store", loc])
        if op == "gate":
            return lambda: _gate(loc, self.first)
        if op == "delete":
            return lambda: _delete(loc, self.second)
        if op == "sign":
            return lambda: _sign(loc, self.first, self.work / "k.pem")
        raise ValueError(op)


def prepare(location: str, tmp_path: Path) -> Case:
    store = Store.open(location, create=True)
    first = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a")).version
    second = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a2", r=2)).version
    make_adapter_dir(tmp_path / "c", r=3)
    store.set_alias("lora-a", "candidate", first.digest)
    assert store.put_bytes(POLICY_BYTES) == POLICY
    store.put_gate_record(second.digest, POLICY, {"passed": True, "checks": [],
                                                  "candidate_digest": second.digest,
                                                  "policy_digest": POLICY})
    store.backend.put("config.json", json.dumps({"protected_aliases": ["release"],
                                                 "gate_policy": {"digest": POLICY}}).encode())
    store.put_bytes(b"garbage for gc to collect")
    return Case(location, store, tmp_path, first.ref, second.ref)


CHILD_ENV = {"ADAPTERS_ACTOR": "crasher",
             # a re-run push on S3 takes the dead push's content claim over after this long
             "ADAPTERS_CLAIM_WAIT": "0.2"}


def fork_child(target: Callable[[], int], point: str | None, log: Path,
               **extra: str) -> int:
    """Run ``target`` in a forked child (the CLI in-process: no interpreter start-up per
    case); its exit code, or minus the signal that killed it. Output goes to ``log``."""
    pid = os.fork()
    if pid == 0:  # the child: armed failpoint, output to the log, never returns
        code = 99
        try:
            os.environ.update({**CHILD_ENV, **extra})
            os.environ.pop(ENV_VAR, None)
            if point:
                os.environ[ENV_VAR] = point
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = target()
        except BaseException:  # noqa: BLE001 - reported through the exit code and the log
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_child(argv: list[str], point: str | None, **extra: str) -> subprocess.CompletedProcess:
    """A real ``python`` process (for merge: torch must not run in a forked pytest)."""
    env = {**environment(), "PYTHONPATH": str(REPO_ROOT), **CHILD_ENV, **extra}
    env.pop(ENV_VAR, None)
    if point:
        env[ENV_VAR] = point
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def effective(store: Store) -> tuple[list[dict], Counter]:
    """Entries not rolled back, and how often each seq was rolled back."""
    log = store.audit().entries()
    rolled = Counter(e["old"]["seq"] for e in log if e["action"] == "recover"
                     and e["new"]["outcome"] == "rolled_back")
    return [e for e in log if e["seq"] not in rolled], rolled


def check_consistent(store: Store) -> None:
    """The invariants that must hold after any crash, before and after recovery."""
    assert store.audit().verify().ok, store.audit().verify().to_json()
    report = verify(store)
    assert report.ok, report.to_json()
    entries, rolled = effective(store)
    assert all(count == 1 for count in rolled.values()), rolled
    intents = pending_intents(store)
    pushes = Counter(e["subject"] for e in entries if e["action"] == "push")
    deletes = Counter(e["subject"] for e in entries if e["action"] == "delete"
                      and not any(i.matches(e) for i in intents))  # a pending delete may not have run
    for name, digest in store.bindings():
        ref = f"{name}@{digest}"
        assert pushes[ref] - deletes[ref] == 1, f"{ref}: {pushes[ref]} push entries"
    pending = {i.id for i in intents}
    for name in store.names():  # an alias holds the newest effective move, or is mid-move
        for alias, digest in store.aliases(name).items():
            moves = [e for e in entries if e["subject"] == f"{name}:{alias}"
                     and e["action"] in ("alias", "promote", "promote-forced")]
            assert moves and (moves[-1]["new"] == digest or (pending and moves[-1]["old"] == digest))
    assert cross_check(store) == []


def settle(case: Case) -> None:
    """Run a harmless mutation that settles markers at once (as an aged marker on S3)."""
    code = fork_child(lambda: main(["alias", "set", "lora-a:settled", case.first, "--store",
                                    case.location]), None, case.work / "settle.log",
                      ADAPTERS_RECOVER_AFTER="0")
    assert code == 0, (case.work / "settle.log").read_text()[-2000:]


CASES = [(op, step) for op in OPERATIONS for step in STEPS]
CASES += [("push", "push.after_blobs"), ("push", "audit.torn_line"),
          ("push", "audit.before_head")]


@pytest.mark.parametrize(("op", "point"), [(op, p if "." in p else f"{op}.{p}")
                                           for op, p in CASES])
def test_crash_at_every_point_leaves_a_consistent_store(store_location: str, tmp_path: Path,
                                                        op: str, point: str) -> None:
    if point == "audit.torn_line" and backend_kind(store_location) != "local":
        pytest.skip("an S3 audit entry is one atomic PUT: it cannot be torn")
    case = prepare(store_location, tmp_path)
    log = tmp_path / "child.log"
    crashed = fork_child(case.command(op), point, log)
    assert crashed == -signal.SIGKILL, (crashed, log.read_text()[-2000:])
    check_consistent(case.store)

    again = fork_child(case.command(op), None, log)  # the next command works
    assert again == 0, log.read_text()[-2000:]
    check_consistent(case.store)
    settle(case)
    check_consistent(case.store)
    assert pending_intents(case.store) == []
    if op == "push":  # the re-run made the version exactly once
        assert len(case.store.versions("lora-c")) == 1
    if op == "delete":
        assert not case.store.is_bound("lora-a", case.second.rpartition("@")[2])
    if op == "promote":
        assert case.store.aliases("lora-a")["release"] == case.store.resolve(case.second).digest


def test_a_recovery_killed_mid_way_rolls_back_exactly_once(store_location: str,
                                                          tmp_path: Path) -> None:
    case = prepare(store_location, tmp_path)
    log = tmp_path / "child.log"
    assert fork_child(case.command("alias"), "alias.after_entry", log) == -signal.SIGKILL
    died = fork_child(lambda: main(["alias", "set", "lora-a:other", case.first, "--store",
                                    case.location]), "recover.after_entry", log,
                      ADAPTERS_RECOVER_AFTER="0")
    assert died == -signal.SIGKILL, log.read_text()[-2000:]
    settle(case)
    _, rolled = effective(case.store)
    assert list(rolled.values()) == [1]
    check_consistent(case.store)
    assert case.store.aliases("lora-a")["candidate"] == case.store.resolve(case.first).digest


@pytest.mark.parametrize("point", ["push.after_blobs", "push.after_entry", "push.after_apply",
                                   "push.after_marker", "push.before_intent"])
def test_merge_killed_at_every_push_point(tmp_path: Path, request: pytest.FixtureRequest,
                                          point: str) -> None:
    """`adapters merge` stores its result with a push: crash it at each point (local and S3)."""
    from tests.support.cli import write_synthetic_adapter, write_synthetic_base

    for kind in ("local", "seaweedfs"):
        location = str(tmp_path / kind) if kind == "local" else \
            f"s3://{request.getfixturevalue('s3_servers').get(kind).bucket}/{tmp_path.name}-m"
        store = Store.open(location, create=True)
        base = write_synthetic_base(tmp_path / f"base-{kind}")
        for name, seed in (("ma", 1), ("mb", 2)):
            adapter = write_synthetic_adapter(tmp_path / f"{name}-{kind}", seed=seed)
            assert main(["push", str(adapter), "--name", name, "--base", str(base),
                         "--store", location]) == 0
        merge = [PYTHON, "-m", "cli.main", "merge", "ma", "mb", "--method", "ties",
                 "--name", "merged", "--store", location]
        assert run_child(merge, point).returncode == -signal.SIGKILL
        check_consistent(store)
        again = run_child(merge, None)
        assert again.returncode == 0, again.stderr[-2000:]
        check_consistent(store)
        assert len(store.versions("merged")) == 1
        assert backend_kind(location) == kind


def test_killed_before_out_is_published_the_same_command_finishes_the_job(tmp_path: Path) -> None:
    # found by a QA pass: merge --out / unload wrote OUT, then pushed; killed in between, OUT
    # was complete with no version, and the same command then failed for ever (exit 4).
    # Now OUT is staged, the version recorded, then OUT renamed into place; a kill there
    # leaves the version, and the same command publishes the same bytes.
    from tests.support.cli import write_synthetic_adapter, write_synthetic_base

    location = str(tmp_path / "store")
    store = Store.open(location, create=True)
    base = write_synthetic_base(tmp_path / "base")
    for name, seed in (("ma", 1), ("mb", 2)):
        adapter = write_synthetic_adapter(tmp_path / name, seed=seed)
        assert main(["push", str(adapter), "--name", name, "--base", str(base),
                     "--store", location]) == 0
    commands = {
        "merged": [PYTHON, "-m", "cli.main", "merge", "ma", "mb", "--method", "ties",
                   "--name", "merged", "--out", str(tmp_path / "merge-out"), "--store", location],
        "ma-unloaded": [PYTHON, "-m", "cli.main", "unload", "ma", "--base", str(base), "--out",
                        str(tmp_path / "unload-out"), "--store", location],
    }
    for name, command in commands.items():
        out = Path(command[command.index("--out") + 1])
        assert run_child(command, "out.before_publish").returncode == -signal.SIGKILL
        assert len(store.versions(name)) == 1 and not out.exists()
        check_consistent(store)
        again = run_child(command, None)
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(store.versions(name)) == 1 and sorted(p.name for p in out.iterdir())
        check_consistent(store)
    assert (tmp_path / "merge-out" / "adapter_model.safetensors").is_file()
    assert main(["verify", "ma-unloaded", "--model", str(tmp_path / "unload-out"),
                 "--store", location]) == 0


def test_a_forced_promotion_killed_after_its_reason_is_settled_not_taken_for_forged(
        tmp_path: Path) -> None:
    # a forced promotion logs its entry, then its reason (same subject, actor and old): a
    # kill after both must be settled like any other, not taken for a hand-written marker
    case = prepare(str(tmp_path / "store"), tmp_path)
    log = tmp_path / "child.log"
    forced = ["promote", case.first, "--to", "release", "--force", "--reason", "hotfix",
              "--store", case.location]
    assert fork_child(lambda: main(forced), "promote.after_entry", log) == -signal.SIGKILL
    check_consistent(case.store)
    assert fork_child(lambda: main(forced), None, log) == 0, log.read_text()[-2000:]
    check_consistent(case.store)
    assert pending_intents(case.store) == []
    assert case.store.aliases("lora-a")["release"] == case.store.resolve(case.first).digest
