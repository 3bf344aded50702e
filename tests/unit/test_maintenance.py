"""verify (every corrupt or missing blob, with its users) and gc (reachability + grace)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from registry.errors import IntegrityError
from registry.lineage import make_lineage, parent
from registry.maintenance.collection import gc, reachable
from registry.maintenance.integrity import verify
from registry.storage.store import Store
from tests.support.registry import (adapter_files, make_adapter_dir, new_store, push_adapter,
                                     sample_record)

POLICY = "sha256:" + "f" * 64


@pytest.fixture()
def populated(tmp_path: Path) -> tuple[Store, dict]:
    store = new_store(tmp_path)
    a = push_adapter(store, "a", make_adapter_dir(tmp_path / "a", seed=1)).version
    b = push_adapter(store, "b", make_adapter_dir(tmp_path / "b", r=2, seed=2)).version
    gate = store.put_gate_record(a.digest, POLICY, {"passed": True})
    return store, {"a": a, "b": b, "gate": gate}


def flip_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_verify_clean_store(populated: tuple[Store, dict]) -> None:
    store, v = populated
    report = verify(store)
    assert report.ok and report.versions == 2
    assert report.blobs == 2 + 4 + 1  # two manifests, four files (none shared), a gate record
    assert report.bytes > 0
    assert report.to_json()["ok"] is True


def _all_blobs(store: Store, v: dict) -> list[tuple[str, str, str]]:
    out = [(v["gate"], "gate record", "gate")]
    for key in ("a", "b"):
        version = v[key]
        out.append((version.digest, f"{version.ref} (manifest)", key))
        out += [(f["digest"], f"{version.ref} {f['path']}", key) for f in version.files]
    return out


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("offset", [0, -1, 40])  # first, last, a middle byte
def test_flipped_byte_in_any_blob_is_caught(populated: tuple[Store, dict], index: int,
                                            offset: int) -> None:
    store, v = populated
    digest, user, _ = _all_blobs(store, v)[index]
    flip_byte(store.blobs.path(digest), offset)
    report = verify(store)
    assert not report.ok
    assert [(p.kind, p.digest) for p in report.problems] == [("corrupt", digest)]
    assert any(user in u for u in report.problems[0].used_by)


def test_missing_blob_is_caught_with_every_user(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    adir = make_adapter_dir(tmp_path / "a")
    v1 = push_adapter(store, "a", adir).version
    v2 = push_adapter(store, "a2", adir).version  # shares both file blobs
    shared = next(f["digest"] for f in v1.files if f["path"] == "adapter_model.safetensors")
    store.blobs.path(shared).unlink()
    report = verify(store)
    assert [(p.kind, p.digest) for p in report.problems] == [("missing", shared)]
    assert sorted(report.problems[0].used_by) == sorted(
        [f"{v1.ref} adapter_model.safetensors", f"{v2.ref} adapter_model.safetensors"])


def test_missing_manifest_and_dangling_alias(populated: tuple[Store, dict]) -> None:
    store, v = populated
    store.set_alias("b", "candidate", v["b"].digest)
    store.blobs.path(v["b"].digest).unlink()
    (store.root / "names/b/versions" / v["b"].digest[7:]).unlink()
    (store.root / "names/b/versions" / ("0" * 64)).write_text("2020-01-01T00:00:00Z\n")
    report = verify(store)
    kinds = sorted((p.kind, p.digest) for p in report.problems)
    assert ("dangling_alias", v["b"].digest) in kinds
    assert ("missing", "sha256:" + "0" * 64) in kinds


def test_verify_one_ref_checks_only_that_version(populated: tuple[Store, dict]) -> None:
    store, v = populated
    flip_byte(store.blobs.path(v["b"].files[0]["digest"]))
    assert verify(store, "a").ok
    assert verify(store, "a").blobs == 1 + 2 + 1  # manifest, files, its gate record
    report = verify(store, "b")
    assert not report.ok and report.versions == 1
    flip_byte(store.blobs.path(v["b"].digest))  # corrupt manifest: verify(ref) still reports
    assert [p.kind for p in verify(store, "b").problems] == ["corrupt"]


def test_gc_keeps_reachable_and_removes_old_unreachable(populated: tuple[Store, dict]) -> None:
    store, v = populated
    orphan_old = store.put_bytes(b"old orphan")
    orphan_young = store.put_bytes(b"young orphan")
    for digest in store.blobs.all_digests():
        age(store.blobs.path(digest), 7200)
    age(store.blobs.path(orphan_young), 10)
    stale_tmp = store.root / "tmp" / "blob-x.partial"
    stale_tmp.write_bytes(b"half")
    age(stale_tmp, 7200)
    fresh_tmp = store.root / "tmp" / "blob-y.partial"
    fresh_tmp.write_bytes(b"in flight")
    before = set(store.blobs.all_digests())

    dry = gc(store, 3600, dry_run=True)
    assert dry.removed == [orphan_old] and dry.dry_run
    assert set(store.blobs.all_digests()) == before and stale_tmp.exists()

    report = gc(store, 3600)
    assert report.removed == [orphan_old] and report.kept_young == [orphan_young]
    assert report.freed_bytes == len(b"old orphan")
    assert report.temp_removed == ["tmp/blob-x.partial"]
    assert not stale_tmp.exists() and fresh_tmp.exists()
    assert set(store.blobs.all_digests()) == before - {orphan_old}
    assert report.kept_reachable == 7
    assert verify(store).ok
    last = store.audit().entries()[-1]
    assert last["action"] == "gc" and last["new"]["removed"] == 1
    assert gc(store, 0).removed == [orphan_young]
    assert verify(store).ok


def test_gc_after_delete_keeps_lineage_manifests(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    a = push_adapter(store, "a", make_adapter_dir(tmp_path / "a", seed=1)).version
    mdir = make_adapter_dir(tmp_path / "m", r=2, seed=2)
    store.push("m", adapter_files(mdir), sample_record(mdir),
               lineage=make_lineage([parent(a)], method="linear"))
    store.delete_version(a.ref)
    report = gc(store, 0)
    assert sorted(report.removed) == sorted(f["digest"] for f in a.files)
    assert store.blobs.exists(a.digest)  # history survives
    assert a.digest in reachable(store)
    assert verify(store).ok


def test_gc_refuses_when_a_manifest_is_damaged(populated: tuple[Store, dict]) -> None:
    store, v = populated
    orphan = store.put_bytes(b"orphan")
    flip_byte(store.blobs.path(v["a"].digest))
    with pytest.raises(IntegrityError, match="gc refused"):
        gc(store, 0)
    assert store.blobs.exists(orphan)
    assert all(store.blobs.exists(f["digest"]) for f in v["a"].files)


def test_gc_cleans_interrupted_atomic_writes(populated: tuple[Store, dict]) -> None:
    store, _ = populated
    leftover = store.root / "names/a/aliases/.candidate.abc.tmp"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text("sha256:")
    age(leftover, 7200)
    assert "names/a/aliases/.candidate.abc.tmp" in gc(store, 3600).temp_removed
    assert not leftover.exists()
    assert store.aliases("a") == {}


def test_gc_removes_stale_temp_directories_only(populated: tuple[Store, dict]) -> None:
    store, _ = populated
    stale = store.root / "tmp" / "unload-old"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "w.bin").write_bytes(b"x")
    for path in (stale / "sub" / "w.bin", stale / "sub", stale):
        age(path, 7200)
    busy = store.root / "tmp" / "unload-busy"
    busy.mkdir()
    age(busy, 7200)
    (busy / "fresh.bin").write_bytes(b"being written")  # newest file is young
    age(busy, 7200)
    report = gc(store, 3600)
    assert report.temp_removed == ["tmp/unload-old"]
    assert not stale.exists() and (busy / "fresh.bin").exists()


def test_gc_leaves_a_live_commands_temp_dir_alone_even_with_no_grace(
        populated: tuple[Store, dict]) -> None:
    # found by a QA pass: `gc --grace 0s` removed a running merge's tmp/merge-* (judged by
    # mtime alone) and the merge failed; a live command now holds a lease (an flock)
    from registry.fsutil import leased_temp_dir

    store, _ = populated
    with leased_temp_dir(store.root / "tmp", "merge-") as live:
        (live / "input-0").mkdir()
        for path in (live / "input-0", live):
            age(path, 7200)
        dead = store.root / "tmp" / "merge-killed"  # what a killed merge left: no lease
        dead.mkdir()
        age(dead, 7200)
        report = gc(store, 0)
        assert live.exists() and not dead.exists()
        assert report.temp_removed == ["tmp/merge-killed"]
    assert not live.exists()  # removed by its owner on the way out


def test_gc_does_not_fail_when_a_temp_dir_vanishes_during_its_scan(
        populated: tuple[Store, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a QA pass: a merge finishing during gc's scan made gc exit 6
    import shutil

    from registry.maintenance import collection

    store, _ = populated
    going = store.root / "tmp" / "merge-finishing"
    (going / "input-0").mkdir(parents=True)

    def finishing(path: Path) -> bool:
        shutil.rmtree(path, ignore_errors=True)  # the merge ends right after the listing
        return False

    monkeypatch.setattr(collection, "is_leased", finishing)
    report = gc(store, 0)
    assert "tmp/merge-finishing" not in report.temp_removed and not going.exists()


def test_gc_keeps_applied_policies_and_tensor_lists(tmp_path: Path) -> None:
    """The policy a gate record was made under, a derived model's per-tensor list (the
    blob its weights digest names) and a searched merge's trials blob are read back."""
    from registry.digests import canonical_json
    from registry.record import build_model_record

    store = new_store(tmp_path)
    adapter = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a")).version
    policy_bytes = canonical_json({"policy": {"version": 1, "checks": []}, "data": {}})
    policy = store.put_bytes(policy_bytes)
    store.put_gate_record(adapter.digest, policy, {"passed": True, "checks": [],
                                                    "candidate_digest": adapter.digest,
                                                    "policy_digest": policy})
    tensor_list = store.put_bytes(canonical_json({"v": 1, "tensors": [["w", "F32", [2], "0" * 64]]}))
    record = build_model_record({"struct_digest": "sha256:" + "1" * 64,
                                 "weights_digest": tensor_list})
    store.record_derived("lora-a-unloaded", record,
                         make_lineage([parent(adapter, role="adapter")], method="unload"))
    trials = store.put_bytes(canonical_json({"trials": [{"number": 0}]}))
    lineage = make_lineage([parent(adapter)], method="ties",
                           report={"search": {"study": "s", "trials_digest": trials}})
    searched = make_adapter_dir(tmp_path / "s", r=2)
    store.push("lora-a-searched", adapter_files(searched), sample_record(searched),
               lineage=lineage)
    garbage = store.put_bytes(b"unreachable")
    report = gc(store, 0, now=time.time() + 10)
    assert garbage in report.removed
    assert policy not in report.removed and tensor_list not in report.removed
    assert trials not in report.removed
    assert store.blobs.read(policy) == policy_bytes
