"""Crash at every named failpoint of every mutation, on every backend (etcd/gofail style).

Each case builds a store, runs one real command in a child process with
``ADAPTERS_FAILPOINT=<point>`` (the child SIGKILLs itself there, see
:mod:`registry.failpoints`), then checks, with its own reading of the log rather
than only ``verify``:

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
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.audit_index import cross_check
from registry.failpoints import OPERATIONS, STEPS
from registry.journal import pending_intents
from registry.maintenance import verify
from registry.store import Store
from tests.backend_fixtures import backend_kind, environment, store_location  # noqa: F401
from tests.registry_fixtures import PYTHON, REPO_ROOT, make_adapter_dir, push_adapter

POLICY = "sha256:" + "7" * 64
KEY_ID = "sha256:" + "8" * 64

# gate records and signatures are written through the library (the CLI's gate needs a
# model; the store call is the same one `adapters gate` makes)
GATE_SCRIPT = """
import sys
from registry.store import Store
store = Store.open(sys.argv[1])
v = store.resolve(sys.argv[2])
store.put_gate_record(v.digest, sys.argv[3], {"passed": True, "candidate_digest": v.digest,
                                             "policy_digest": sys.argv[3], "checks": []})
"""
DELETE_SCRIPT = """
import sys
from registry.errors import NotFoundError
from registry.store import Store
try:
    Store.open(sys.argv[1]).delete_version(sys.argv[2])
except NotFoundError:  # the crashed run got as far as unbinding it
    pass
"""
SIGN_SCRIPT = """
import sys
from pathlib import Path
from registry.signing import generate_key, sign_version
from registry.store import Store
store = Store.open(sys.argv[1])
v = store.resolve(sys.argv[2])
key = Path(sys.argv[3])
if not key.exists():
    generate_key(key, key.with_suffix(".pub"))
store.add_signature(v, sign_version(v.name, v.digest, key))
"""


@dataclass
class Case:
    """A store prepared for one crashing command."""

    location: str
    store: Store
    work: Path
    first: str   # ref of lora-a's first version
    second: str  # ref of lora-a's second version

    def command(self, op: str) -> list[str]:
        """The child process's argv for operation ``op``."""
        cli = [PYTHON, "-m", "cli.main"]
        loc = self.location
        if op == "push":
            return [*cli, "push", str(self.work / "c"), "--name", "lora-c", "--store", loc]
        if op == "alias":
            return [*cli, "alias", "set", "lora-a:candidate", self.second, "--store", loc]
        if op == "promote":
            return [*cli, "promote", self.second, "--to", "release", "--store", loc]
        if op == "delete":  # the library call (the CLI has no command that unbinds)
            return [PYTHON, "-c", DELETE_SCRIPT, loc, self.second]
        if op == "gc":
            return [*cli, "gc", "--grace", "0s", "--store", loc]
        if op == "gate":
            return [PYTHON, "-c", GATE_SCRIPT, loc, self.first, "sha256:" + "9" * 64]
        if op == "sign":
            return [PYTHON, "-c", SIGN_SCRIPT, loc, self.first, str(self.work / "k.pem")]
        raise ValueError(op)


def prepare(location: str, tmp_path: Path) -> Case:
    store = Store.open(location, create=True)
    first = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a")).version
    second = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a2", r=2)).version
    make_adapter_dir(tmp_path / "c", r=3)
    store.set_alias("lora-a", "candidate", first.digest)
    store.put_gate_record(second.digest, POLICY, {"passed": True, "checks": [],
                                                  "candidate_digest": second.digest,
                                                  "policy_digest": POLICY})
    store.backend.put("config.json", json.dumps({"protected_aliases": ["release"],
                                                 "gate_policy": {"digest": POLICY}}).encode())
    store.put_bytes(b"garbage for gc to collect")
    return Case(location, store, tmp_path, first.ref, second.ref)


def run_child(argv: list[str], point: str | None, **extra: str) -> subprocess.CompletedProcess:
    # a re-run push on S3 takes the dead push's content claim over after this long
    env = {**environment(), "PYTHONPATH": str(REPO_ROOT), "ADAPTERS_ACTOR": "crasher",
           "ADAPTERS_CLAIM_WAIT": "0.2", **extra}
    env.pop("ADAPTERS_FAILPOINT", None)
    if point:
        env["ADAPTERS_FAILPOINT"] = point
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
    done = run_child([PYTHON, "-m", "cli.main", "alias", "set", "lora-a:settled", case.first,
                      "--store", case.location], None, ADAPTERS_RECOVER_AFTER="0")
    assert done.returncode == 0, done.stderr


CASES = [(op, step) for op in OPERATIONS for step in STEPS]
CASES += [("push", "push.after_blobs"), ("push", "audit.torn_line"),
          ("push", "audit.before_head")]


@pytest.mark.parametrize(("op", "point"), [(op, p if "." in p else f"{op}.{p}")
                                           for op, p in CASES])
def test_crash_at_every_point_leaves_a_consistent_store(store_location: str, tmp_path: Path,  # noqa: F811
                                                        op: str, point: str) -> None:
    if point == "audit.torn_line" and backend_kind(store_location) != "local":
        pytest.skip("an S3 audit entry is one atomic PUT: it cannot be torn")
    case = prepare(store_location, tmp_path)
    crashed = run_child(case.command(op), point)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr[-2000:])
    check_consistent(case.store)

    again = run_child(case.command(op), None)  # the next command works
    assert again.returncode == 0, again.stderr[-2000:]
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


def test_a_recovery_killed_mid_way_rolls_back_exactly_once(store_location: str,  # noqa: F811
                                                          tmp_path: Path) -> None:
    case = prepare(store_location, tmp_path)
    assert run_child(case.command("alias"), "alias.after_entry").returncode == -signal.SIGKILL
    died = run_child([PYTHON, "-m", "cli.main", "alias", "set", "lora-a:other", case.first,
                      "--store", case.location], "recover.after_entry", ADAPTERS_RECOVER_AFTER="0")
    assert died.returncode == -signal.SIGKILL
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
    from tests.cli_fixtures import write_synthetic_adapter, write_synthetic_base

    for kind in ("local", "seaweedfs"):
        location = str(tmp_path / kind) if kind == "local" else \
            f"s3://{request.getfixturevalue('s3_servers').get(kind).bucket}/{tmp_path.name}-m"
        store = Store.open(location, create=True)
        base = write_synthetic_base(tmp_path / f"base-{kind}")
        for name, seed in (("ma", 1), ("mb", 2)):
            adapter = write_synthetic_adapter(tmp_path / f"{name}-{kind}", seed=seed)
            done = run_child([PYTHON, "-m", "cli.main", "push", str(adapter), "--name", name,
                              "--base", str(base), "--store", location], None)
            assert done.returncode == 0, done.stderr[-2000:]
        merge = [PYTHON, "-m", "cli.main", "merge", "ma", "mb", "--method", "ties",
                 "--name", "merged", "--store", location]
        assert run_child(merge, point).returncode == -signal.SIGKILL
        check_consistent(store)
        again = run_child(merge, None)
        assert again.returncode == 0, again.stderr[-2000:]
        check_consistent(store)
        assert len(store.versions("merged")) == 1
        assert backend_kind(location) == kind
