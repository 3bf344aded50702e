"""Audit log: hash chain, head, and detection of edited/removed/reordered/truncated lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.audit.log import AuditLog
from registry.audit.chain import entry_hash
from registry.digests import canonical_json
from registry.errors import IntegrityError
from registry.maintenance.collection import gc
from tests.support.registry import make_adapter_dir, new_store, push_adapter


@pytest.fixture()
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path)
    for i in range(5):
        audit.append("alias", f"x:a{i}", old=None if i == 0 else f"d{i - 1}", new=f"d{i}",
                     actor="alice")
    return audit


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def write(log: AuditLog, rows: list[str]) -> None:
    log.path.write_text("".join(row + "\n" for row in rows))


def kinds(log: AuditLog) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in log.verify().problems]


def test_entries_are_chained(log: AuditLog) -> None:
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_hash"] is None
    for prev, entry in zip(entries, entries[1:], strict=False):
        assert entry["prev_hash"] == prev["hash"]
    for entry in entries:
        assert set(entry) == {"seq", "ts", "actor", "action", "subject", "old", "new",
                              "prev_hash", "hash"}
        assert entry["hash"] == entry_hash(entry)
    assert json.loads(log.head_path.read_text()) == {"seq": 5, "hash": entries[-1]["hash"]}
    report = log.verify()
    assert report.ok and report.entries == 5 and report.to_json()["problems"] == []


def test_actor_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_ACTOR", "robot")
    assert AuditLog(tmp_path).append("push", "x")["actor"] == "robot"


def test_edited_line_is_caught(log: AuditLog) -> None:
    rows = lines(log)
    rows[2] = rows[2].replace('"alice"', '"mallory"')
    write(log, rows)
    assert kinds(log) == [(3, "hash_mismatch")]


def test_edited_line_with_recomputed_hash_breaks_the_chain(log: AuditLog) -> None:
    rows = lines(log)
    entry = json.loads(rows[1])
    entry["new"] = "evil"
    entry["hash"] = entry_hash(entry)
    rows[1] = canonical_json(entry).decode()
    write(log, rows)
    assert kinds(log) == [(3, "chain_break")]


def test_removed_line_is_caught(log: AuditLog) -> None:
    rows = lines(log)
    del rows[2]
    write(log, rows)
    assert kinds(log) == [(3, "seq_gap"), (3, "chain_break")]


def test_reordered_lines_are_caught(log: AuditLog) -> None:
    rows = lines(log)
    rows[1], rows[2] = rows[2], rows[1]
    write(log, rows)
    found = kinds(log)
    assert (2, "seq_gap") in found and (3, "seq_order") in found
    assert {k for _, k in found} >= {"chain_break"}


def test_truncated_tail_is_caught_by_head(log: AuditLog) -> None:
    write(log, lines(log)[:-2])
    assert kinds(log) == [(0, "head_mismatch")]
    log.path.unlink()
    assert kinds(log) == [(0, "head_mismatch")]


def test_garbage_and_malformed_lines(log: AuditLog) -> None:
    rows = lines(log)
    rows.insert(1, "{not json")
    rows.insert(3, '{"seq": 99}')
    write(log, rows)
    found = kinds(log)
    assert (2, "unparsable") in found and (4, "malformed") in found
    with pytest.raises(IntegrityError, match="line 2"):
        log.entries()


def test_missing_head_with_lines_is_reported(log: AuditLog) -> None:
    log.head_path.unlink()
    assert kinds(log) == [(0, "head_mismatch")]


def test_append_after_lost_head_write_adopts_the_line(log: AuditLog) -> None:
    head_before = log.head_path.read_bytes()
    log.append("push", "y")
    log.head_path.write_bytes(head_before)  # as if we crashed between line and head writes
    entry = log.append("push", "z")
    assert entry["seq"] == 7
    assert log.verify().ok


def test_two_lost_head_writes_in_a_row_leave_a_log_that_still_appends(
        log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a resource-exhaustion pass: on a full disk the line fits in the log's last page
    # but the head's temp file does not; the next writer adopted the line without writing its
    # head, appended a second line past it, and every later command read an edited log (exit 3)
    import errno

    from registry.audit import log as log_module

    real = log_module.atomic_write_bytes

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module, "atomic_write_bytes", full)
    for subject in ("a", "b", "c"):
        with pytest.raises(OSError):
            log.append("alias", subject)
    assert len(lines(log)) == 6  # the first failure's line only: the others failed first
    monkeypatch.setattr(log_module, "atomic_write_bytes", real)
    entry = log.append("alias", "d")
    assert entry["seq"] == 7 and log.verify().ok
    assert json.loads(log.head_path.read_text())["seq"] == 7


def test_append_after_truncation_is_refused_and_problem_stays_visible(log: AuditLog) -> None:
    write(log, lines(log)[:-1])
    with pytest.raises(IntegrityError, match="refusing to append"):
        log.append("push", "y")  # chaining onto the cut tail would hide the cut
    report = log.verify()
    assert not report.ok
    assert {p.kind for p in report.problems} == {"head_mismatch"}


def test_every_store_operation_is_audited(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    version = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a")).version
    push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a"))  # idempotent: not audited
    store.set_alias("lora-a", "candidate", version.digest)
    store.set_alias("lora-a", "candidate", version.digest)  # no-op: not audited
    store.put_gate_record(version.digest, "sha256:" + "e" * 64, {"passed": True})
    store.set_alias("lora-a", "release", version.digest, protected_ok=True, action="promote")
    gc(store, 0)
    gc(store, 0, dry_run=True)  # dry runs change nothing: not audited
    actions = [(e["action"], e["subject"]) for e in store.audit().entries()]
    assert [a for a, _ in actions] == ["init", "push", "alias", "gate", "promote", "gc"]
    assert actions[1][1] == version.ref and actions[2][1] == "lora-a:candidate"
    assert store.audit().verify().ok
