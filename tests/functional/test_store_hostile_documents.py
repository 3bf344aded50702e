"""Damaged or hand-written store documents, found by a QA pass (stop 21): every reader
reports them as tampering (exit 3) with one line; none crashes (exit 70) or recurses
without bound.

* JSON nested 100 000 levels deep in the audit log, its head or a manifest (Python's
  parser raises RecursionError, which escaped every ``except ValueError``);
* audit lines that are JSON but not entries (``{"seq": 5}``, ``[1]``);
* a checkpoint whose ``seq`` is ``1e999``;
* manifests whose lineage has the wrong shape (parents a string, a weight a string, ...)
  or whose record does (``export`` wrote the model card from it);
* an audited, legitimate lineage deeper than the tree is shown (``--depth``, cap 100).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from registry.audit.checkpoint import PAYLOAD_TYPE, check_checkpoint
from registry.digests import canonical_json
from registry.errors import IntegrityError
from registry.lineage import make_lineage, parent
from registry.storage.store import Store
from tests.support.cli import run, run_json
from tests.support.registry import adapter_files, make_adapter_dir, push_adapter, sample_record

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store.open(tmp_path / "store", create=True)
    push_adapter(st, "alpha", make_adapter_dir(tmp_path / "a"))
    return st


def _refused(capsys: pytest.CaptureFixture[str], store: Store, *args: str) -> str:
    code, _out, err = run(capsys, *args, "--store", store.root)
    assert code == 3, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.strip().splitlines()[-2].startswith("error: "), err
    return err


def _plant(store: Store, name: str, data: bytes) -> str:
    digest = store.blobs.put_bytes(data)[0]
    binding = store.root / "names" / name / "versions" / digest.split(":", 1)[1]
    binding.parent.mkdir(parents=True, exist_ok=True)
    binding.write_text("2030-01-01T00:00:00Z")
    return digest


@pytest.mark.parametrize("line", [DEEP, '{"seq": 5}', "[1]"])
def test_audit_lines_that_are_not_entries_are_tampering(store, capsys, line):
    with open(store.root / "audit" / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(line + "\n")
    for args in (("audit", "verify"), ("audit", "log"), ("verify", "--all")):
        _refused(capsys, store, *args)


def test_a_deeply_nested_audit_head_is_tampering(store, capsys):
    (store.root / "audit" / "head.json").write_text(DEEP)
    assert "nested too deeply" in _refused(capsys, store, "audit", "verify")


def test_a_deeply_nested_manifest_is_tampering(store, capsys):
    _plant(store, "deep", DEEP.encode())
    for args in (("verify", "--all"), ("ls",), ("lineage", "alpha", "--down")):
        _refused(capsys, store, *args)


def test_a_checkpoint_seq_that_is_not_an_integer_is_malformed():
    for seq in ("1e999", "-1", "true", '"7"'):
        payload = base64.b64encode(f'{{"seq": {seq}, "hash": "x"}}'.encode()).decode()
        envelope = {"payloadType": PAYLOAD_TYPE, "payload": payload, "signatures": []}
        with pytest.raises(IntegrityError, match="malformed audit checkpoint .*seq"):
            check_checkpoint(envelope, [], {})


@pytest.mark.parametrize("lineage", [
    {"parents": "abc"}, {"parents": 5}, {"parents": ["abc"]}, {"parents": [{"ref": "a"}]},
    {"parents": [{"digest": 5}]}, {"parents": [{"digest": "@A", "weight": "heavy"}]},
    {"parents": [{"digest": "@A", "role": {"a": 1}}]}, {"parents": [], "recipe": [1]},
    {"parents": [{"digest": "@A", "ref": "lora-b@sha256:" + "0" * 64}]},  # names another version
    {"parents": [{"digest": "@A", "ref": "../../verify?x=<b>"}]},
])
def test_a_manifest_with_malformed_lineage_is_tampering(store, capsys, lineage):
    alpha = store.resolve("alpha")
    text = json.dumps(lineage).replace('"@A"', json.dumps(alpha.digest))
    manifest = dict(alpha.manifest, name="x", lineage=json.loads(text))
    _plant(store, "x", canonical_json(manifest))
    for args in (("lineage", "x"), ("lineage", "alpha", "--down"), ("show", "x")):
        assert "not a valid manifest: lineage." in _refused(capsys, store, *args)
    # gc refuses sooner: the planted binding is one no audit entry records
    assert "refs and its audit log disagree" in _refused(capsys, store, "gc", "--dry-run")
    # a healthy version still shows, its children reported as not listed (found by a QA pass)
    code, shown = run_json(capsys, "show", "alpha", "--store", store.root)
    assert code == 0 and shown["lineage"]["children"] is None
    assert "not a valid manifest: lineage." in shown["lineage"]["children_problem"]
    assert "bad_manifest" in _refused(capsys, store, "verify", "--all")


@pytest.mark.parametrize(("field", "value"), [("metrics", "abc"), ("known_risks", 5),
                                               ("peft", []), ("tensors", 5)])
def test_export_refuses_a_record_adapterkit_never_wrote(store, capsys, tmp_path, field, value):
    alpha = store.resolve("alpha")
    _plant(store, "r", canonical_json(dict(alpha.manifest, name="r",
                                           record=dict(alpha.record, **{field: value}))))
    err = _refused(capsys, store, "export", "r", str(tmp_path / "out"))
    assert f"record.{field}" in err and not (tmp_path / "out").exists()


def test_a_lineage_deeper_than_the_cap_is_cut_and_marked(store, capsys, tmp_path):
    source = make_adapter_dir(tmp_path / "c")
    version = store.resolve("alpha")
    for i in range(105):
        version = store.push("chain", adapter_files(source), sample_record(source),
                             lineage=make_lineage([parent(version, weight=1.0)], method="linear",
                                                  parameters={"i": i})).version
    code, tree = run_json(capsys, "lineage", "chain", "--store", store.root)
    assert code == 0
    depth, node = 0, tree
    while node["children"]:
        depth, node = depth + 1, node["children"][0]
    assert depth == 100 and node["truncated"] and node["name"] == "chain"
    code, tree = run_json(capsys, "lineage", "chain", "--depth", "3", "--store", store.root)
    assert code == 0 and tree["children"][0]["children"][0]["children"][0]["truncated"]
    code, out, _ = run(capsys, "lineage", "alpha", "--down", "--depth", "2", "--store", store.root)
    assert code == 0 and "raise --depth" in out
    code, down = run_json(capsys, "lineage", "alpha", "--down", "--store", store.root)
    assert code == 0 and down["children"][0]["name"] == "chain"


def test_what_the_log_records_and_the_store_lost_is_reported(store, capsys, tmp_path):
    # found by a QA pass: an alias file, a binding or a signature removed by hand went
    # unnoticed by `verify --all` and `audit verify` (exit 0)
    beta = push_adapter(store, "beta", make_adapter_dir(tmp_path / "b", seed=3)).version
    store.set_alias("alpha", "candidate", store.resolve("alpha").digest)
    code, _, err = run(capsys, "verify", "--all", "--store", store.root)
    assert code == 0, err
    (store.root / "names" / "alpha" / "aliases" / "candidate").unlink()
    (store.root / "names" / "beta" / "versions" / beta.digest.split(":", 1)[1]).unlink()
    code, report = run_json(capsys, "verify", "--all", "--store", store.root)
    assert code == 3
    removed = {tuple(p["used_by"]) for p in report["problems"] if p["kind"] == "removed"}
    assert removed == {("alpha:candidate",), (f"names/beta/versions/{beta.digest[7:]}",)}
    # `verify REF` reports what concerns that version
    code, one = run_json(capsys, "verify", "alpha", "--store", store.root)
    assert code == 3 and [tuple(p["used_by"]) for p in one["problems"]] == [("alpha:candidate",)]
    # an audited removal is not reported
    store.set_alias("alpha", "candidate", store.resolve("alpha").digest)
    store.delete_alias("alpha", "candidate")
    code, report = run_json(capsys, "verify", "--all", "--store", store.root)
    assert {tuple(p["used_by"]) for p in report["problems"]} == {
        (f"names/beta/versions/{beta.digest[7:]}",)}


def test_a_hand_written_intent_marker_excuses_nothing_on_a_local_store(store, capsys, tmp_path):
    # found by a QA pass: a marker forged from an old push entry made `verify --all` take a
    # hand-removed binding for a push in flight, and the next writer then logged a plausible
    # "rolled back" for a version that had existed all along
    beta = push_adapter(store, "beta", make_adapter_dir(tmp_path / "b", seed=3)).version
    push_adapter(store, "gamma", make_adapter_dir(tmp_path / "c", seed=4))  # a later write
    entry = next(e for e in store.audit().entries() if e["subject"] == beta.ref)
    (store.root / "names" / "beta" / "versions" / beta.digest.split(":", 1)[1]).unlink()
    marker = {"id": "0001-forged", "after_seq": entry["seq"] - 1,
              **{k: entry[k] for k in ("ts", "actor", "action", "subject", "old", "new")}}
    (store.root / "audit" / "pending" / "0001-forged").write_text(json.dumps(marker))
    code, report = run_json(capsys, "verify", "--all", "--store", store.root)
    assert code == 3
    kinds = {(p["kind"], tuple(p["used_by"])) for p in report["problems"]}
    assert ("removed", (f"names/beta/versions/{beta.digest[7:]}",)) in kinds
    assert ("unaudited", ("audit/pending/0001-forged",)) in kinds
    entries = len(store.audit().entries())
    err = _refused(capsys, store, "tag", "gamma:tmp", "gamma")  # the next writer stops
    assert "written by hand" in err and len(store.audit().entries()) == entries


def test_a_checkpoint_after_a_dead_writers_entry_is_not_a_later_write(store, capsys, tmp_path):
    # found by an upgrade QA pass: older `audit checkpoint` appended its entry without settling
    # a dead writer's marker first, and the forged-marker rule then took that marker for a
    # hand-written one (verify exit 3, every writer stopped)
    alpha = store.resolve("alpha")
    entry = store.audit().append("alias", "alpha:dev", old=None, new=alpha.digest, actor="dead")
    marker = {"id": "0001-dead", "after_seq": entry["seq"] - 1,
              **{k: entry[k] for k in ("ts", "actor", "action", "subject", "old", "new")}}
    (store.root / "audit" / "pending" / "0001-dead").write_text(json.dumps(marker))
    store.audit().append("checkpoint", "audit", new={"seq": entry["seq"], "hash": entry["hash"]})
    code, report = run_json(capsys, "verify", "--all", "--store", store.root)
    assert code == 0, report
    code, _, err = run(capsys, "tag", "alpha:tmp", "alpha", "--store", store.root)
    assert code == 0, err                      # the next writer settles it: rolled back
    assert store.audit().entries()[-2]["action"] == "recover"
    assert "dev" not in store.aliases("alpha")
