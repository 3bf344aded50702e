"""Issue 11's bypasses, each tried the way an attacker with the CLI and file access would.

* a policy other than the store's pinned one cannot promote (``--policy other.yaml``);
* a gate record copied from another version, or forged beside the audit log, cannot
  promote, and ``verify`` (whole store) reports it (exit 3);
* a binding file added by hand under ``names/<name>/versions/`` is reported (exit 3);
* an audit append that hits a short write (file size limit) fails cleanly (exit 6),
  leaves no torn line and no half-done change, and the next command works;
* two crashes in a row (the old protocol forked the chain) leave a linear chain.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from cli.main import main
from registry.digests import canonical_json
from registry.storage.store import Store
from tests.support.cli import run, run_json
from tests.support.registry import PYTHON, REPO_ROOT, child_env, make_adapter_dir, push_adapter

POLICY_YAML = "version: 1\nchecks:\n  - kind: structural\n"


def gate_record(store: Store, digest: str, policy: str, passed: bool = True) -> str:
    return store.put_gate_record(digest, policy, {"passed": passed, "checks": [],
                                                  "candidate_digest": digest,
                                                  "policy_digest": policy})


@pytest.fixture
def world(tmp_path: Path) -> tuple[Store, dict[str, str], str, Path]:
    """A store pinning a policy file; versions a, b of one name; a passing record for a."""
    from gate.policy import load_policy

    store = Store.open(tmp_path / "store", create=True)
    policy = tmp_path / "store" / "gate.yaml"
    policy.write_text(POLICY_YAML)
    pinned = load_policy(policy).digest
    config = {"protected_aliases": ["release"], "gate_policy": {"path": "gate.yaml",
                                                                "digest": pinned}}
    store.backend.put("config.json", canonical_json(config))
    refs = {}
    for label, r in (("a", 4), ("b", 2)):
        refs[label] = push_adapter(store, "lora", make_adapter_dir(tmp_path / label, r=r)).version.ref
    gate_record(store, refs["a"].rpartition("@")[2], pinned)
    return store, refs, pinned, tmp_path


def test_a_policy_other_than_the_pinned_one_cannot_promote(world, capsys) -> None:
    store, refs, _, tmp = world
    other = tmp / "trivial.yaml"
    other.write_text(POLICY_YAML + "seed: 7\n")  # another digest, equally trivial
    from gate.policy import load_policy

    b = refs["b"].rpartition("@")[2]
    gate_record(store, b, load_policy(other).digest)  # b "passed" the trivial policy
    code, _, err = run(capsys, "promote", refs["b"], "--to", "release", "--policy", other,
                       "--store", store.location)
    assert code == 1 and "is not the policy this store pins" in err
    assert "release" not in store.aliases("lora")
    # with --force --reason it goes through, audited as forced with the reason
    code, out = run_json(capsys, "promote", refs["b"], "--to", "release", "--policy", other,
                         "--force", "--reason", "INC-7", "--store", store.location, "--json")
    assert code == 0 and out["forced"] is True
    actions = [e["action"] for e in store.audit().entries()][-2:]
    assert actions == ["promote-forced", "promote-forced-reason"]


def test_the_pinned_policy_still_promotes(world, capsys) -> None:
    store, refs, _, _ = world
    assert main(["promote", refs["a"], "--to", "release", "--store", store.location]) == 0
    assert store.aliases("lora")["release"] == refs["a"].rpartition("@")[2]


def test_a_copied_gate_record_neither_promotes_nor_verifies(world, capsys) -> None:
    store, refs, pinned, _ = world
    a, b = (refs[k].rpartition("@")[2] for k in ("a", "b"))
    record = store.read_pointer(store.gate_key(a, pinned))
    store.backend.put(store.gate_key(b, pinned), (record + "\n").encode())  # cp gates/A/P gates/B/P
    code, _, err = run(capsys, "promote", refs["b"], "--to", "release", "--store", store.location)
    assert code == 1 and "was made for" in err
    assert "release" not in store.aliases("lora")
    code, out = run_json(capsys, "verify", "--store", store.location, "--json")
    assert code == 3
    assert [p["kind"] for p in out["problems"]] == ["unaudited"]
    assert "gate record" in out["problems"][0]["detail"]


def forge_record_beside_the_log(store: Store, candidate: str, policy: str) -> str:
    """A passing record for ``candidate`` written by hand (no audit entry): its digest."""
    forged = store.put_bytes(canonical_json({"passed": True, "checks": [],
                                             "candidate_digest": candidate,
                                             "policy_digest": policy}))
    store.backend.put(store.gate_key(candidate, policy), (forged + "\n").encode())
    return forged


def test_a_forged_record_beside_the_log_cannot_promote(world, capsys) -> None:
    store, refs, pinned, _ = world
    forge_record_beside_the_log(store, refs["b"].rpartition("@")[2], pinned)
    code, _, err = run(capsys, "promote", refs["b"], "--to", "release", "--store", store.location)
    assert code == 1 and "no audit entry vouches" in err
    assert main(["verify", "--store", store.location]) == 3


def test_a_hand_added_binding_is_caught(world, capsys) -> None:
    store, refs, _, _ = world
    manifest = store.resolve(refs["a"]).manifest
    forged = {**manifest, "record": {**manifest["record"], "license": "mit"}}
    digest = store.put_bytes(canonical_json(forged))
    key = f"names/lora/versions/{digest[7:]}"
    store.backend.put(key, b"2026-01-01T00:00:00.000000Z\n")
    code, out = run_json(capsys, "verify", "--store", store.location, "--json")
    assert code == 3
    assert out["problems"][0]["kind"] == "unaudited" and out["problems"][0]["used_by"] == [key]
    code, _, err = run(capsys, "verify", "--store", store.location)
    assert code == 3 and key in err + capsys.readouterr().out


def _limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_short_audit_write_fails_cleanly_and_the_next_command_works(world) -> None:
    store, refs, _, _ = world
    log = Path(store.location) / "audit" / "log.jsonl"
    before, head = log.read_bytes(), (log.parent / "head.json").read_bytes()
    # room for the intent marker (a new small file) but not for the whole audit line
    argv = [PYTHON, "-m", "cli.main", "alias", "set", "lora:candidate", refs["b"],
            "--store", store.location]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                          preexec_fn=lambda: _limited(len(before) + 40), timeout=120)
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("error: ") and "\nfix: " in done.stderr
    assert "Traceback" not in done.stderr
    assert log.read_bytes() == before and (log.parent / "head.json").read_bytes() == head
    assert "candidate" not in store.aliases("lora")
    assert not list((Path(store.location) / "audit").glob("pending/*"))
    assert main(["alias", "set", "lora:candidate", refs["b"], "--store", store.location]) == 0
    assert store.audit().verify().ok and main(["verify", "--store", store.location]) == 0


def test_two_crashes_in_a_row_do_not_fork_the_chain(world) -> None:
    store, refs, _, tmp = world
    env = {**child_env()}
    for point, argv in (("push.after_entry", ["push", str(tmp / "b"), "--name", "other"]),
                        ("alias.after_entry", ["alias", "set", "lora:candidate", refs["a"]])):
        done = subprocess.run([PYTHON, "-m", "cli.main", *argv, "--store", store.location],
                              cwd=REPO_ROOT, env={**env, "ADAPTERS_FAILPOINT": point},
                              capture_output=True, timeout=120)
        assert done.returncode == -signal.SIGKILL
    assert main(["push", str(tmp / "b"), "--name", "other", "--store", store.location]) == 0
    report = store.audit().verify()
    assert report.ok, report.to_json()
    seqs = [e["seq"] for e in store.audit().entries()]
    assert seqs == list(range(1, len(seqs) + 1))
    outcomes = [e["new"]["outcome"] for e in store.audit().entries() if e["action"] == "recover"]
    assert outcomes == ["rolled_back", "rolled_back"]
    assert main(["verify", "--store", store.location]) == 0
    assert json.loads((Path(store.location) / "audit" / "head.json").read_text())["seq"] == seqs[-1]


def test_a_failed_head_write_after_a_committed_line_is_rolled_back(world, monkeypatch) -> None:
    """The line is durable but audit/head.json cannot be written (disk full): the change
    is not applied, the store still verifies, and the next writer rolls the entry back."""
    import errno

    import registry.audit.log
    from registry.maintenance.integrity import verify

    store, refs, _, _ = world
    real = registry.audit.log.atomic_write_bytes

    def full_disk(path: Path, data: bytes, **kwargs: object) -> None:
        if path.name == "head.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(registry.audit.log, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError):
        store.set_alias("lora", "candidate", refs["b"])
    monkeypatch.setattr(registry.audit.log, "atomic_write_bytes", real)
    assert "candidate" not in store.aliases("lora")
    assert store.audit().verify().ok and verify(store).ok  # the pending entry is explained
    assert main(["alias", "set", "lora:other", refs["a"], "--store", store.location]) == 0
    log = store.audit().entries()
    moved = [e for e in log if e["subject"] == "lora:candidate"]
    assert [e["action"] for e in moved] == ["alias", "recover"]
    assert moved[1]["new"]["outcome"] == "rolled_back" and moved[1]["old"]["seq"] == moved[0]["seq"]
    assert store.audit().verify().ok and verify(store).ok
    assert not list((Path(store.location) / "audit").glob("pending/*"))


def test_a_gate_entry_forged_mid_log_vouches_for_nothing(world, capsys) -> None:
    # found by a QA pass: promote read the log's entries without checking the chain, so a
    # "gate" line inserted mid-log (any hash) vouched for a record written beside it
    store, refs, pinned, _ = world
    b = refs["b"].rpartition("@")[2]
    forged = forge_record_beside_the_log(store, b, pinned)
    log = Path(store.location) / "audit" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    entry = {"seq": 2, "ts": "2026-01-01T00:00:00Z", "actor": "ci", "action": "gate",
             "subject": f"lora@{b}", "old": None,
             "new": {"passed": True, "policy": pinned, "record": forged},
             "prev_hash": None, "hash": "sha256:" + "0" * 64}
    lines.insert(1, json.dumps(entry) + "\n")  # the tail and head.json stay as they were
    log.write_text("".join(lines))
    code, _, err = run(capsys, "promote", refs["b"], "--to", "release", "--store", store.location)
    assert code == 3 and "fails its hash-chain check (log line 2" in err
    assert err.startswith("error: ") and "\nfix: " in err and "Traceback" not in err
    assert "release" not in store.aliases("lora")
    code, out = run_json(capsys, "verify", "--store", store.location, "--json")
    assert code == 3 and any("hash-chain" in p["detail"] for p in out["problems"])


def test_a_policy_data_file_swapped_during_the_gate_is_not_evaluated(tmp_path) -> None:
    # found by a QA pass: the policy digest hashed the data file, and the checks re-read it
    # by path later; a file swapped in between was evaluated under the original's digest
    from gate.eval_data import read_texts
    from gate.policy import load_policy

    (tmp_path / "heldout.txt").write_text("the real held-out text\n\nsecond document\n")
    (tmp_path / "gate.yaml").write_text("version: 1\nchecks:\n  - kind: perplexity\n"
                                        "    data: heldout.txt\n    max: 100\n")
    policy = load_policy(tmp_path / "gate.yaml")
    (tmp_path / "heldout.txt").write_text("an easy text the attacker chose\n")
    data = policy.checks[0].data_file("data")
    assert read_texts(data) == ["the real held-out text", "second document"]
    assert policy.data_digests["heldout.txt"] == "sha256:" + __import__("hashlib").sha256(
        b"the real held-out text\n\nsecond document\n").hexdigest()


def test_a_release_alias_with_a_trailing_newline_is_refused(world, capsys, tmp_path) -> None:
    # found by a QA pass: "$" matches before a final newline, so "release\n" passed the alias
    # check and became an unprotected alias that line-stripping readers see as "release"
    store, _, _, _ = world
    for argv in (["push", str(make_adapter_dir(tmp_path / "c", r=3)), "--name", "lora",
                  "--alias", "release\n"],
                 ["push", str(make_adapter_dir(tmp_path / "d", r=3)), "--name", "evil\n"]):
        code, _, err = run(capsys, *argv, "--store", store.location)
        assert code == 2 and err.startswith("error: invalid ")
    assert sorted(store.aliases("lora")) == [] and "evil\n" not in store.names()


def test_a_removed_audit_log_is_reported(world, capsys) -> None:
    # found by a QA pass: with log.jsonl and head.json both deleted, `audit verify` said
    # "0 entries" and exited 0 although the store holds versions (each push is logged first)
    store, refs, _, _ = world
    for name in ("log.jsonl", "head.json"):
        (Path(store.location) / "audit" / name).unlink()
    code, out = run_json(capsys, "audit", "verify", "--store", store.location)
    assert code == 3 and out["ok"] is False
    assert out["problems"][0]["kind"] == "missing"
    code, _, err = run(capsys, "audit", "verify", "--store", store.location)
    assert code == 3 and "the log is empty but the store holds versions" in err
    code, _, err = run(capsys, "promote", refs["a"], "--to", "release", "--store", store.location)
    assert code == 1 and "release" not in store.aliases("lora")


def test_a_gate_rerun_between_promotes_check_and_move_is_a_conflict(world, capsys,
                                                                     monkeypatch) -> None:
    # seen in the code by a QA pass: promote checked the record, then moved the alias; a
    # failing gate recorded in between was not noticed. The check is repeated under the
    # refs lock, which gate records are written under too.
    from gate import promote as promote_module

    store, refs, pinned, _ = world
    a = refs["a"].rpartition("@")[2]
    checked = promote_module.require_passing_gate

    def then_regated(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = checked(*args, **kwargs)
        gate_record(store, a, pinned, passed=False)  # a failing gate lands now (audited)
        return record

    monkeypatch.setattr(promote_module, "require_passing_gate", then_regated)
    code, _, err = run(capsys, "promote", refs["a"], "--to", "release", "--store", store.location)
    assert code == 4 and "changed while promoting" in err
    assert "release" not in store.aliases("lora")
