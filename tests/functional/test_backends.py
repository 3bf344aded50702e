"""One store test suite, run on every backend: a local directory, moto and SeaweedFS (S3 APIs).

The matrix and the servers are :mod:`tests.plugins.s3` (``store_location``).

* push / resolve / dedup / materialize behave the same on all three;
* alias compare-and-swap refuses stale expectations; protected aliases stay protected;
* the audit chain verifies, and an edited entry or a truncated tail is detected;
* gate records, verify (corrupt blob found) and gc (unreachable blobs reclaimed) work;
* 8 processes pushing and moving one alias with expect-CAS retry loops lose no update
  and leave an audit log that verifies.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
from collections import Counter
from pathlib import Path

import pytest

from registry.storage.backends.select import open_backend
from registry.digests import canonical_json, sha256_digest
from registry.errors import BadInputError, ConflictError, GateFailedError, NotFoundError
from registry.maintenance.collection import gc
from registry.maintenance.integrity import verify
from registry.storage.store import Store
from tests.plugins.s3 import is_s3
from tests.support.registry import (adapter_files, make_adapter_dir, push_adapter, run_together,
                                     sample_record)

WORKERS = 8
MOVES_PER_WORKER = 6


def _tamper(store: Store, key: str, data: bytes) -> None:
    """Overwrite one stored object behind the store's back (as an attacker would)."""
    if is_s3(store.location):
        store.backend.put(key, data)
    else:
        path = store.backend.local_path(key)
        path.chmod(0o644)
        path.write_bytes(data)


def test_push_resolve_dedup_materialize(store_location: str, tmp_path: Path) -> None:
    store = Store.open(store_location, create=True)
    assert Store.open(store_location).location == store.location
    src = make_adapter_dir(tmp_path / "a", seed=1)
    first = push_adapter(store, "org/lora", src)
    assert first.created and first.new_bytes > 0
    again = push_adapter(store, "org/lora", src)
    assert not again.created and again.version.digest == first.version.digest
    other = push_adapter(store, "org/lora", src, metrics={"eval_loss": 0.5})
    assert other.created and other.new_bytes == 0  # same files, deduplicated
    assert store.names() == ["org/lora"]
    assert [v.digest for v in store.versions("org/lora")] == [other.version.digest,
                                                              first.version.digest]
    assert store.resolve("org/lora").digest == other.version.digest
    assert store.resolve(f"org/lora@{first.version.short}").digest == first.version.digest
    out = store.materialize("org/lora", tmp_path / "out")
    for path, src_path in adapter_files(src).items():
        assert (out / path).read_bytes() == src_path.read_bytes()
    digest = store.put_bytes(b"hello")
    with store.open_blob(digest) as handle:
        assert handle.read() == b"hello"
    if is_s3(store_location):
        with pytest.raises(BadInputError, match="S3 store"):
            store.blobs.path(digest)
    else:
        assert store.blobs.path(digest).read_bytes() == b"hello"
    with pytest.raises(NotFoundError):
        store.resolve("nope")
    assert verify(store).ok


def test_open_refuses_missing_and_foreign(store_location: str) -> None:
    with pytest.raises(NotFoundError):
        Store.open(store_location)
    store = Store.open(store_location, create=True)
    assert Store.open(store_location, create=True).location == store.location  # idempotent
    assert len(store.audit().entries()) == 1
    foreign = store_location + "-foreign"
    if is_s3(foreign):
        open_backend(foreign).put("stray.txt", b"not a store")
    else:
        Path(foreign).mkdir()
        (Path(foreign) / "stray.txt").write_text("not a store")
    with pytest.raises(BadInputError, match="not an adapter store"):
        Store.open(foreign, create=True)


def test_alias_compare_and_swap(store_location: str, tmp_path: Path) -> None:
    store = Store.open(store_location, create=True)
    v1, v2 = (push_adapter(store, "lora", make_adapter_dir(tmp_path / f"a{i}", seed=i))
              .version.digest for i in range(2))
    assert store.set_alias("lora", "candidate", v1, expect=None) is None
    with pytest.raises(ConflictError, match="points to"):
        store.set_alias("lora", "candidate", v2, expect=None)
    with pytest.raises(ConflictError):
        store.set_alias("lora", "candidate", v2, expect=v2)
    assert store.set_alias("lora", "candidate", v2, expect=v1) == v1
    assert store.set_alias("lora", "candidate", v2) == v2  # no-op, not audited
    assert store.resolve("lora:candidate").digest == v2
    with pytest.raises(ConflictError):
        store.delete_alias("lora", "candidate", expect=v1)
    with pytest.raises(GateFailedError):
        store.set_alias("lora", "release", v1)
    store.set_alias("lora", "release", v1, action="promote", protected_ok=True)
    with pytest.raises(ConflictError):
        store.delete_version(f"lora@{v1}")
    assert store.delete_alias("lora", "candidate", expect=v2) == v2
    assert store.aliases("lora") == {"release": v1}
    moves = [(e["action"], e["old"], e["new"]) for e in store.audit().entries()
             if e["subject"].startswith("lora:")]
    assert moves == [("alias", None, v1), ("alias", v1, v2), ("promote", None, v1),
                     ("alias", v2, None)]


def test_a_removal_that_lost_its_race_does_not_count(store_location: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a QA pass on SeaweedFS: S3's delete returned False for an object another
    # remover had just deleted, and every racing `alias rm` (even with --expect) "won"
    store = Store.open(store_location, create=True)
    v1 = push_adapter(store, "lora", make_adapter_dir(tmp_path / "a", seed=1)).version.digest
    store.set_alias("lora", "dev", v1)
    real = store.backend.delete

    def beaten(key: str, etag: str | None = None) -> bool:
        real(key)  # another remover's delete lands first
        return real(key, etag)

    monkeypatch.setattr(store.backend, "delete", beaten)
    with pytest.raises(ConflictError):
        store.delete_alias("lora", "dev", expect=v1)
    monkeypatch.undo()
    removals = [e for e in store.audit().entries()
                if e["subject"] == "lora:dev" and e["action"] == "alias" and e["new"] is None]
    rolled = {e["old"]["seq"] for e in store.audit().entries() if e["action"] == "recover"}
    assert all(e["seq"] in rolled for e in removals)  # the lost removal is rolled back
    # the simulated other remover deleted the object without an audit entry, which verify
    # reports as such; nothing else is wrong
    problems = verify(store).problems
    assert [(p.kind, p.used_by) for p in problems] == [("removed", ("lora:dev",))]
    assert store.audit().verify().ok


def test_audit_chain_verifies_and_detects_tampering(store_location: str,
                                                    tmp_path: Path) -> None:
    store = Store.open(store_location, create=True)
    for i in range(3):
        push_adapter(store, f"n{i}", make_adapter_dir(tmp_path / f"a{i}", seed=i))
    log = store.audit()
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert [e["action"] for e in entries] == ["init", "push", "push", "push"]
    assert log.verify().ok
    edited = {**entries[1], "actor": "mallory"}
    if is_s3(store_location):
        _tamper(store, "audit/entries/000000000002", canonical_json(edited))
    else:
        lines = (store.root / "audit/log.jsonl").read_text().splitlines()
        lines[1] = json.dumps(edited)
        (store.root / "audit/log.jsonl").write_text("\n".join(lines) + "\n")
    assert {p.kind for p in log.verify().problems} == {"hash_mismatch"}
    _tamper_restore_and_truncate(store, entries)
    assert "head_mismatch" in {p.kind for p in store.audit().verify().problems}


def _tamper_restore_and_truncate(store: Store, entries: list[dict]) -> None:
    """Undo the edit, then drop the last entry (a valid chain, but a short one)."""
    if is_s3(store.location):
        _tamper(store, "audit/entries/000000000002", canonical_json(entries[1]))
        assert store.audit().verify().ok
        store.backend.delete("audit/entries/000000000004")
    else:
        rows = [canonical_json(e).decode() for e in entries]
        (store.root / "audit/log.jsonl").write_text("\n".join(rows) + "\n")
        assert store.audit().verify().ok
        (store.root / "audit/log.jsonl").write_text("\n".join(rows[:-1]) + "\n")


def test_gate_records_verify_and_gc(store_location: str, tmp_path: Path) -> None:
    store = Store.open(store_location, create=True)
    keep = push_adapter(store, "a", make_adapter_dir(tmp_path / "a", seed=1)).version
    drop = push_adapter(store, "b", make_adapter_dir(tmp_path / "b", seed=2)).version
    policy = sha256_digest(b"policy")
    record = store.put_gate_record(keep.ref, policy, {"passed": True, "score": 0.9})
    assert store.gate_record(keep.digest, policy) == {"passed": True, "score": 0.9}
    assert store.gate_pointers() == [(keep.digest, policy, record)]
    orphan = store.put_bytes(b"orphan")
    store.delete_version(drop.ref)
    assert gc(store, 3600).removed == []  # everything is young
    report = gc(store, 0, now=10**10)
    kept_files = {f["digest"] for f in keep.files}  # adapter_config.json is shared
    assert set(report.removed) == {orphan, drop.digest,
                                   *(f["digest"] for f in drop.files)} - kept_files
    assert report.kept_reachable == 2 + len(kept_files)
    assert not store.blobs.exists(orphan) and store.blobs.exists(record)
    assert verify(store).ok and store.audit().verify().ok
    victim = keep.files[0]["digest"]
    _tamper(store, f"blobs/sha256/{victim[7:]}", b"not the adapter")
    problems = verify(store).problems
    assert [(p.kind, p.digest) for p in problems] == [("corrupt", victim)]
    with pytest.raises(Exception, match="corrupt"):
        store.materialize(keep, tmp_path / "out")


def _worker(location: str, seed: int, adapter_dir: str, digests: list[str],
            start: mp.synchronize.Event, results: mp.Queue) -> None:
    store = Store.open(location)
    rng = random.Random(seed)
    start.wait()
    pushed = store.push(f"w{seed % 4}", adapter_files(Path(adapter_dir)),
                        sample_record(Path(adapter_dir)))
    moves, done, conflicts = [], 0, 0
    while done < MOVES_PER_WORKER:
        current = store.aliases("lora").get("candidate")
        target = rng.choice([d for d in digests if d != current])
        try:
            store.set_alias("lora", "candidate", target, expect=current, actor=f"worker-{seed}")
        except ConflictError:
            conflicts += 1
            continue
        moves.append((current, target))
        done += 1
    results.put((seed, pushed.version.digest, pushed.created, moves, conflicts))


def test_concurrent_pushes_and_alias_moves_lose_nothing(store_location: str,
                                                        tmp_path: Path) -> None:
    store = Store.open(store_location, create=True)
    digests = [push_adapter(store, "lora", make_adapter_dir(tmp_path / f"l{i}", seed=i),
                            metrics={"eval_loss": float(i)}).version.digest for i in range(4)]
    store.set_alias("lora", "candidate", digests[0], expect=None)
    dirs = [make_adapter_dir(tmp_path / f"w{i % 4}", seed=100 + i % 4) for i in range(WORKERS)]
    outcomes = run_together(_worker, [(store_location, seed, str(dirs[seed]), digests)
                                      for seed in range(WORKERS)], timeout=240)

    # pushes: workers seed and seed + 4 pushed identical content: one version each
    for name in (f"w{i}" for i in range(4)):
        assert len(store.versions(name)) == 1
    created = Counter(digest for _, digest, was_created, _, _ in outcomes if was_created)
    assert all(count == 1 for count in created.values()) and len(created) == 4

    moved = Counter(m for *_, moves, _ in outcomes for m in moves)
    log = store.audit().entries()
    # on S3 a move that lost its compare-and-swap was logged first (intent), then rolled
    # back by a `recover` entry naming its seq: only effective entries are moves
    rolled_back = {e["old"]["seq"] for e in log if e["action"] == "recover"}
    entries = [e for e in log if e["action"] == "alias" and e["subject"] == "lora:candidate"
               and e["seq"] not in rolled_back]
    assert len(entries) == 1 + WORKERS * MOVES_PER_WORKER  # initial set + every success
    assert Counter((e["old"], e["new"]) for e in entries[1:]) == moved
    # no lost update: the successful moves form one path from the first target to the
    # alias's final value (two moves from the same `old` would unbalance a node)
    balance = Counter()
    for old, new in moved.elements():
        balance[old] += 1
        balance[new] -= 1
    final = store.aliases("lora")["candidate"]
    expected = Counter({digests[0]: 1, final: -1}) if final != digests[0] else Counter()
    assert +balance == +expected and -balance == -expected
    if not is_s3(store_location):  # local moves are logged under the lock, in order
        for prev, entry in zip(entries, entries[1:], strict=False):
            assert entry["old"] == prev["new"]
    per_worker = Counter(e["actor"] for e in entries[1:])
    assert per_worker == Counter({f"worker-{s}": MOVES_PER_WORKER for s in range(WORKERS)})
    report = store.audit().verify()
    assert report.ok, report.to_json()
    assert verify(store).ok


def test_audit_checkpoint_on_every_backend(store_location: str, tmp_path: Path) -> None:
    """A checkpoint of the log's newest entry holds while the log grows, on every backend."""
    from registry.audit.checkpoint import check_checkpoint, sign_checkpoint
    from registry.signing import generate_key, load_trusted_keys

    store = Store.open(store_location, create=True)
    push_adapter(store, "n0", make_adapter_dir(tmp_path / "a0", seed=0))
    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    trusted = load_trusted_keys([tmp_path / "k.pub"])
    envelope = sign_checkpoint(store.audit().entries(), tmp_path / "k.pem")
    assert check_checkpoint(envelope, store.audit().entries(), trusted) == (2, [])
    push_adapter(store, "n1", make_adapter_dir(tmp_path / "a1", seed=1))  # appends keep it valid
    assert check_checkpoint(envelope, store.audit().entries(), trusted) == (2, [])
    forged = [{**e, "hash": "sha256:" + "0" * 64} if e["seq"] == 2 else e
              for e in store.audit().entries()]
    seq, problems = check_checkpoint(envelope, forged, trusted)
    assert seq == 2 and "history rewritten" in problems[0]


def test_adapters_home_may_name_an_s3_store(store_location: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a QA pass: $ADAPTERS_HOME=s3://bucket/prefix was read as a local path
    # ("s3:/bucket/prefix") and refused, while --store took the same URL
    monkeypatch.setenv("ADAPTERS_HOME", store_location)
    created = Store.open(None, create=True)
    assert created.location == Store.open(store_location).location
    assert is_s3(store_location) == (created.location.startswith("s3://"))


def test_a_writer_between_the_reads_is_not_tampering(store_location: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a QA pass: `audit verify` read the log then its head, and `verify --all` the
    # audit index then the store; a push or delete landing in between (a concurrent writer,
    # frequent on S3) was reported as tampering (exit 3)
    store = Store.open(store_location, create=True)
    push_adapter(store, "lora", make_adapter_dir(tmp_path / "a", seed=1))
    log = store.audit()
    reader = "_rows" if hasattr(log, "_rows") else "_lines"
    real = getattr(type(log), reader)
    writes = iter(range(2))

    def racing(self):  # a writer appends (and moves the head) just after the entries are read
        entries = real(self)
        for i in writes:
            push_adapter(store, f"race{i}", make_adapter_dir(tmp_path / f"r{i}", seed=10 + i))
            break
        return entries

    monkeypatch.setattr(type(log), reader, racing)
    assert store.audit().verify().ok
    monkeypatch.undo()
    real_bindings = type(store).bindings
    deletes = iter(["race0"])

    def bindings_after_a_delete(self):  # the index is read, then a delete lands, then the listing
        for name in deletes:
            store.delete_version(store.resolve(name).ref)
        return real_bindings(self)

    monkeypatch.setattr(type(store), "bindings", bindings_after_a_delete)
    assert verify(store).problems == []
