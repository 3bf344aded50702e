"""Store: layout, push/dedup/idempotence, names and refs, aliases (CAS), gate records."""

from __future__ import annotations

import json
import os
import stat
import re
from pathlib import Path

import pytest

from registry.digests import check_digest, sha256_digest
from registry.errors import (BadInputError, ConflictError, GateFailedError, IntegrityError,
                             NotFoundError)
from registry.lineage import make_lineage, parent
from registry.record import build_model_record
from registry.storage.refs import validate_alias
from registry.storage.store import ANY, MODEL_ARTIFACT, Store
from tests.support.registry import (adapter_files, blob_bytes, make_adapter_dir, new_store,
                                     push_adapter, sample_record)


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return new_store(tmp_path)


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return make_adapter_dir(tmp_path / "adapter")


# ---- opening ---------------------------------------------------------------------

def test_open_missing_store_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as err:
        Store.open(tmp_path / "nope")
    assert "adapters init" in (err.value.fix or "")


def test_create_writes_layout_and_is_idempotent(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", create=True)
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert store.protected_aliases == ["release"]
    for sub in ("blobs/sha256", "names", "gates", "audit", "locks", "tmp"):
        assert (store.root / sub).is_dir()
    again = Store.open(tmp_path / "s", create=True)
    assert again.root == store.root


def test_create_refuses_non_empty_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "file.txt").write_text("x")
    with pytest.raises(BadInputError):
        Store.open(tmp_path / "d", create=True)


def test_default_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path / "home"))
    store = Store.open(create=True)
    assert store.root == tmp_path / "home"


# ---- push ------------------------------------------------------------------------

def test_push_stores_read_only_blobs_and_manifest(store: Store, adapter: Path) -> None:
    result = push_adapter(store, "lora-a", adapter)
    assert result.created and result.new_bytes == sum(p.stat().st_size
                                                      for p in adapter_files(adapter).values())
    version = result.version
    assert version.ref == f"lora-a@{version.digest}"
    assert [f["path"] for f in version.files] == ["adapter_config.json",
                                                 "adapter_model.safetensors"]
    manifest_bytes = store.blobs.path(version.digest).read_bytes()
    assert sha256_digest(manifest_bytes) == version.digest
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2 and manifest["name"] == "lora-a"
    for entry in version.files:
        path = store.blobs.path(entry["digest"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert sha256_digest(path.read_bytes()) == entry["digest"]
    assert (store.root / "names/lora-a/versions" / version.digest[7:]).is_file()


def test_second_push_is_deduplicated_and_idempotent(store: Store, adapter: Path) -> None:
    first = push_adapter(store, "lora-a", adapter)
    before = blob_bytes(store)
    files_before = sorted(p.name for p in (store.root / "blobs/sha256").iterdir())
    # a re-push builds a fresh record (new created time): still the same version
    second = push_adapter(store, "lora-a", adapter, created="2030-01-01T00:00:00Z")
    assert not second.created and second.new_bytes == 0
    assert second.version.digest == first.version.digest
    assert blob_bytes(store) == before
    assert sorted(p.name for p in (store.root / "blobs/sha256").iterdir()) == files_before
    assert len(store.versions("lora-a")) == 1
    assert not any((store.root / "tmp").iterdir())


def test_same_files_other_record_is_new_version_sharing_blobs(store: Store, adapter: Path) -> None:
    first = push_adapter(store, "lora-a", adapter)
    before = blob_bytes(store)
    second = push_adapter(store, "lora-a", adapter, metrics={"eval_loss": 0.9})
    assert second.created and second.new_bytes == 0
    assert second.version.digest != first.version.digest
    manifest_size = store.blobs.path(second.version.digest).stat().st_size
    assert blob_bytes(store) == before + manifest_size
    assert [v.digest for v in store.versions("lora-a")] == [second.version.digest,
                                                           first.version.digest]


def test_push_progress_reports_all_bytes(store: Store, adapter: Path) -> None:
    seen: list[int] = []
    store.push("lora-a", adapter_files(adapter), sample_record(adapter), progress=seen.append)
    assert sum(seen) == sum(p.stat().st_size for p in adapter.iterdir())


def test_push_validates_record_and_artifact_type(store: Store, adapter: Path) -> None:
    bad = sample_record(adapter)
    bad["peft"]["r"] = 0
    with pytest.raises(BadInputError, match="peft.r"):
        store.push("x", adapter_files(adapter), bad)
    with pytest.raises(BadInputError, match="artifact type"):
        store.push("x", adapter_files(adapter), sample_record(adapter), artifact_type="nope")
    with pytest.raises(BadInputError, match="does not match"):
        store.push("x", adapter_files(adapter), sample_record(adapter),
                   artifact_type=MODEL_ARTIFACT)


@pytest.mark.parametrize("name", ["../x", "/abs", "/etc/passwd", "a\\b", "a/../b", "..", ".",
                                  "a/b/c", "", "a//b", "-lead", "x/versions", "x/aliases",
                                  "sha256", "a b", "a\x00b", "evil\n", "org/x\n", "x\r"])
def test_bad_names_are_refused(store: Store, adapter: Path, name: str) -> None:
    with pytest.raises(BadInputError):
        push_adapter(store, name, adapter)
    assert not list((store.root / "names").rglob("*"))
    assert not (store.root.parent / "x").exists()


@pytest.mark.parametrize("alias", ["release\n", "candidate\n", "x\r\n", " release", "release "])
def test_aliases_with_line_breaks_or_spaces_are_refused(alias: str) -> None:
    # Python's "$" matches before a final newline: "release\n" once passed validation and
    # became an unprotected alias that lists as "release" to line-stripping readers
    with pytest.raises(BadInputError):
        validate_alias(alias)
    with pytest.raises(BadInputError):
        check_digest("sha256:" + "a" * 64 + "\n")


@pytest.mark.parametrize("path", ["../evil", "/abs", "a/../../b", "a\\b", "./x", ""])
def test_bad_file_paths_are_refused(store: Store, adapter: Path, path: str) -> None:
    with pytest.raises(BadInputError):
        store.push("x", {path: adapter / "adapter_config.json"}, sample_record(adapter))


def test_org_names_and_nested_files(store: Store, adapter: Path, tmp_path: Path) -> None:
    sub = tmp_path / "extra.txt"
    sub.write_text("hello")
    files = {**adapter_files(adapter), "docs/extra.txt": sub}
    version = store.push("org/lora", files, sample_record(adapter)).version
    push_adapter(store, "org", adapter)
    assert store.names() == ["org", "org/lora"]
    out = store.materialize("org/lora", tmp_path / "mat")
    assert (out / "docs" / "extra.txt").read_text() == "hello"
    assert store.resolve("org/lora").digest == version.digest


def test_lineage_parent_must_exist(store: Store, adapter: Path) -> None:
    ghost = {"digest": "sha256:" + "9" * 64, "role": "input"}
    with pytest.raises(NotFoundError):
        store.push("x", adapter_files(adapter), sample_record(adapter),
                   lineage={"parents": [ghost]})


# ---- refs ------------------------------------------------------------------------

def test_resolve_all_ref_forms(store: Store, adapter: Path) -> None:
    v1 = push_adapter(store, "lora-a", adapter).version
    v2 = push_adapter(store, "lora-a", adapter, metrics={"eval_loss": 0.5}).version
    hex2 = v2.digest[7:]
    assert store.resolve("lora-a").digest == v2.digest  # latest
    assert store.resolve(f"lora-a@{v1.digest}").digest == v1.digest
    assert store.resolve(f"lora-a@{hex2[:6]}").digest == v2.digest
    assert store.resolve(f"lora-a@sha256:{hex2[:10]}").digest == v2.digest
    assert store.resolve(f"lora-a@{hex2.upper()[:8]}").digest == v2.digest
    assert store.resolve(v1.digest).digest == v1.digest
    store.set_alias("lora-a", "candidate", v1.digest)
    assert store.resolve("lora-a:candidate").digest == v1.digest


def test_resolve_errors(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    with pytest.raises(BadInputError):
        store.resolve(f"lora-a@{version.digest[7:12]}")  # 5 hex digits: too short
    with pytest.raises(BadInputError):
        store.resolve("lora-a@xyzxyzxyz")
    with pytest.raises(NotFoundError):
        store.resolve("nobody")
    with pytest.raises(NotFoundError):
        store.resolve("lora-a:release")
    with pytest.raises(NotFoundError):
        store.resolve("lora-a@" + "0" * 64)
    with pytest.raises(BadInputError):
        store.resolve("../lora-a")


def test_ambiguous_prefix_is_bad_input(store: Store, adapter: Path) -> None:
    push_adapter(store, "lora-a", adapter)
    vdir = store.root / "names/lora-a/versions"
    for tail in ("1", "2"):
        (vdir / ("abcdef" + "0" * 57 + tail)).write_text("2020-01-01T00:00:00Z\n")
    with pytest.raises(BadInputError, match="ambiguous"):
        store.resolve("lora-a@abcdef")


def test_manifest_tampering_is_detected_on_resolve(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    path = store.blobs.path(version.digest)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes().replace(b"tester", b"mallet"))
    with pytest.raises(IntegrityError):
        store.resolve("lora-a")


# ---- aliases ---------------------------------------------------------------------

def test_set_alias_compare_and_swap(store: Store, adapter: Path) -> None:
    v1 = push_adapter(store, "lora-a", adapter).version
    v2 = push_adapter(store, "lora-a", adapter, metrics={"eval_loss": 0.5}).version
    assert store.set_alias("lora-a", "candidate", v1.digest, expect=None) is None
    with pytest.raises(ConflictError) as err:
        store.set_alias("lora-a", "candidate", v2.digest, expect=None)
    assert v1.digest in err.value.message and v1.digest in (err.value.fix or "")
    with pytest.raises(ConflictError):
        store.set_alias("lora-a", "candidate", v2.digest, expect=v2.digest)
    assert store.set_alias("lora-a", "candidate", v2.digest, expect=v1.digest) == v1.digest
    assert store.set_alias("lora-a", "candidate", v1.digest, expect=v2.digest[7:15]) == v2.digest
    assert store.set_alias("lora-a", "candidate", v2.digest, expect=ANY) == v1.digest
    assert store.set_alias("lora-a", "candidate", f"lora-a@{v1.digest}") == v2.digest
    assert store.aliases("lora-a") == {"candidate": v1.digest}
    assert (store.root / "names/lora-a/aliases/candidate").read_text() == v1.digest + "\n"


def test_alias_target_must_be_version_of_same_name(store: Store, adapter: Path,
                                                   tmp_path: Path) -> None:
    push_adapter(store, "lora-a", adapter)
    other = push_adapter(store, "lora-b", make_adapter_dir(tmp_path / "b", seed=3)).version
    with pytest.raises(NotFoundError):
        store.set_alias("lora-a", "candidate", other.digest)
    with pytest.raises(BadInputError):
        store.set_alias("lora-a", "candidate", other.ref)
    with pytest.raises(BadInputError):
        store.set_alias("lora-a", "../x", other.digest)


def test_protected_alias_needs_promote(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    with pytest.raises(GateFailedError):
        store.set_alias("lora-a", "release", version.digest)
    with pytest.raises(GateFailedError):
        store.delete_alias("lora-a", "release")
    store.set_alias("lora-a", "release", version.digest, protected_ok=True, action="promote")
    last = store.audit().entries()[-1]
    assert (last["action"], last["subject"], last["new"]) == ("promote", "lora-a:release",
                                                              version.digest)


def test_protected_aliases_come_from_config(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    (store.root / "config.json").write_text(json.dumps({"protected_aliases": ["prod"]}))
    store.set_alias("lora-a", "release", version.digest)
    with pytest.raises(GateFailedError):
        store.set_alias("lora-a", "prod", version.digest)


def test_delete_alias_and_version(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    store.set_alias("lora-a", "candidate", version.digest)
    with pytest.raises(ConflictError):
        store.delete_version(version.ref)
    with pytest.raises(ConflictError):
        store.delete_alias("lora-a", "candidate", expect=None)
    assert store.delete_alias("lora-a", "candidate", expect=version.digest) == version.digest
    assert store.delete_alias("lora-a", "candidate") is None
    assert store.delete_version("lora-a").digest == version.digest
    assert store.names() == []
    actions = [e["action"] for e in store.audit().entries()]
    assert actions[-2:] == ["alias", "delete"]


# ---- materialize, derived models, gate records -----------------------------------

def test_materialize_round_trips_bytes(store: Store, adapter: Path, tmp_path: Path) -> None:
    push_adapter(store, "lora-a", adapter)
    out = store.materialize("lora-a", tmp_path / "out")
    for name, src in adapter_files(adapter).items():
        assert (out / name).read_bytes() == src.read_bytes()
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644


def test_materialize_refuses_corrupt_blob(store: Store, adapter: Path, tmp_path: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    entry = next(f for f in version.files if f["path"] == "adapter_model.safetensors")
    path = store.blobs.path(entry["digest"])
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.materialize(version, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".partial")]
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.materialize(version, tmp_path / "out2")


def test_record_derived_model_by_reference(store: Store, adapter: Path, tmp_path: Path) -> None:
    source = push_adapter(store, "lora-a", adapter).version
    record = build_model_record({"struct_digest": "sha256:" + "a" * 64,
                                 "weights_digest": "sha256:" + "b" * 64},
                                location="/models/merged", base_model="tiny-llama",
                                author="tester")
    lineage = make_lineage([parent(source, role="adapter")], method="merge_and_unload")
    before = blob_bytes(store)
    result = store.record_derived("lora-a-merged", record, lineage)
    assert result.created and result.new_bytes == 0
    version = result.version
    assert version.kind == "model" and version.artifact_type == MODEL_ARTIFACT
    assert version.files == [] and version.record["weights"]["weights_digest"].endswith("b" * 64)
    assert blob_bytes(store) == before + store.blobs.path(version.digest).stat().st_size
    assert store.record_derived("lora-a-merged", record, lineage).created is False
    with pytest.raises(BadInputError):
        store.materialize(version, tmp_path / "out")
    with pytest.raises(BadInputError):
        store.record_derived("x", record, None)  # type: ignore[arg-type]


def test_gate_records(store: Store, adapter: Path) -> None:
    version = push_adapter(store, "lora-a", adapter).version
    policy = "sha256:" + "c" * 64
    assert store.gate_record(version.digest, policy) is None
    digest = store.put_gate_record(version.digest, policy, {"passed": True, "checks": [1, 2]})
    assert store.gate_record(version.digest, policy) == {"passed": True, "checks": [1, 2]}
    assert store.gate_pointers() == [(version.digest, policy, digest)]
    last = store.audit().entries()[-1]
    assert last["action"] == "gate" and last["new"]["passed"] is True
    store.put_gate_record("lora-a", policy, {"passed": False})
    assert store.gate_record(version.digest, policy) == {"passed": False}
    assert store.audit().entries()[-1]["old"] == digest
    path = store.blobs.path(store.gate_pointers()[0][2])
    os.chmod(path, 0o644)
    path.write_bytes(b'{"passed":true}')
    with pytest.raises(IntegrityError):
        store.gate_record(version.digest, policy)


def test_put_bytes_and_open_blob(store: Store) -> None:
    digest = store.put_bytes(b"hello")
    assert digest == sha256_digest(b"hello")
    with store.open_blob(digest) as handle:
        assert handle.read() == b"hello"
    with pytest.raises(NotFoundError):
        store.open_blob("sha256:" + "0" * 64)
    with pytest.raises(BadInputError):
        store.blobs.path("sha256:../../etc/passwd")


@pytest.mark.parametrize("location", ["S3://bucket/prefix", "gs://bucket/p", "file:///tmp/x",
                                      "https://example.com/store"])
def test_unsupported_store_url_schemes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  location: str) -> None:
    # found by a QA pass: `adapters init S3://bucket/prefix` created a local ./S3:/bucket/prefix
    monkeypatch.chdir(tmp_path)
    for create in (True, False):
        with pytest.raises(BadInputError, match="unsupported store location scheme"):
            Store.open(location, create=create)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("location", "words"), [
    ("s3://", "no bucket"), ("s3:", "no bucket"),
    ("s3://Bad_Bucket!/x", "'Bad_Bucket!' is not a valid S3 bucket name"),
])
def test_malformed_s3_locations_are_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             location: str, words: str) -> None:
    # found by a QA pass: a bad bucket name reached botocore (exit 6 and a 400-character regex
    # dump), and `s3://` became a local directory `s3:` (exit 5)
    monkeypatch.chdir(tmp_path)
    for create in (True, False):
        with pytest.raises(BadInputError, match=re.escape(words)) as err:
            Store.open(location, create=create)
        assert len(err.value.message) < 120
    assert list(tmp_path.iterdir()) == []


def test_check_out_dir_says_what_is_in_the_way(tmp_path: Path) -> None:
    from registry.errors import ConflictError
    from registry.fsutil import check_out_dir

    assert check_out_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConflictError, match="is a file, not a directory"):
        check_out_dir(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConflictError, match="already exists and is not empty"):
        check_out_dir(tmp_path / "full")
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(ConflictError, match="symbolic link"):
        check_out_dir(tmp_path / "link")


@pytest.mark.parametrize("command", [["ls"], ["audit", "verify"], ["gc", "--dry-run"]])
def test_cli_store_option_keeps_a_bucketless_s3_url_as_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    # known since stop 22: `--store s3:///bucket` was parsed as a Path, which folds it into
    # s3:/bucket, a valid store named "bucket"; `init s3:///bucket` already said "no bucket"
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main([*command, "--store", "s3:///bucket"]) == 2
    err = capsys.readouterr().err
    assert "S3 store location 's3:///bucket': no bucket" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["ls"], ["gc", "--dry-run"], ["init"]])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_store_option_is_refused_not_read_as_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str], value: str) -> None:
    # found by a CLI contract pass: `--store "$UNSET"` ran against the current directory
    from cli.main import main
    from registry.storage.store import Store

    Store.open(tmp_path / "here", create=True)
    monkeypatch.chdir(tmp_path / "here")
    assert main([*command, "--store", value]) == 2
    err = capsys.readouterr().err
    # "": every empty argument is refused up front (cli.common.check_nonempty); blanks here
    assert ("empty value for '--store'" if value == "" else "the store location is empty") in err
