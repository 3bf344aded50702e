"""The registry commands end to end through ``cli.main.main`` (exit codes, JSON, files).

Inputs are synthetic (numpy + safetensors) so these tests run without torch; the
PEFT round trip lives in ``test_roundtrip_peft.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import (
    heavy_modules_after,
    make_writable,
    run,
    run_json,
    tree_bytes,
    write_synthetic_adapter,
    write_synthetic_base,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "store"
    code, data = run_json(capsys, "init", "--store", root)
    assert code == 0 and Path(data["root"]) == root
    return root


def push(capsys, store: Path, adapter: Path, name: str, *extra: str) -> dict:
    """``adapters push --json``; returns the pushed version's JSON (plus ``push`` = the rest)."""
    code, data = run_json(capsys, "push", adapter, "--name", name, "--store", store, *extra)
    assert code == 0, data
    return {**data["version"], "push": data}


def blob(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.split(":", 1)[1]


def test_push_ls_show_record(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "a")
    data = push(capsys, store, adapter, "org/demo", "--alias", "candidate",
                "--hparam", "lr=1e-4", "--hparam", "epochs=3", "--metric", "acc=0.91",
                "--risk", "may hallucinate", "--license", "apache-2.0", "--label", "team=nlp",
                "--dataset-version", "v3", "--base-model", "tiny-llama", "--base-revision", "main")
    assert data["push"]["created"] is True and data["push"]["new_bytes"] > 0
    assert data["ref"] == f"org/demo@{data['digest']}"
    assert {f["path"] for f in data["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    assert data["push"]["alias"] == {"alias": "candidate", "old": None, "new": data["digest"]}

    code, listing = run_json(capsys, "ls", "--store", store)
    assert code == 0
    (entry,) = listing["names"]
    assert entry["name"] == "org/demo" and entry["aliases"] == {"candidate": data["digest"]}
    assert [v["digest"] for v in entry["versions"]] == [data["digest"]]
    assert entry["versions"][0]["aliases"] == ["candidate"]

    code, shown = run_json(capsys, "show", "org/demo:candidate", "--store", store)
    assert code == 0 and shown["digest"] == data["digest"]
    record = shown["record"]
    assert record["peft"]["r"] == 4 and record["tensors"]["count"] == 8
    assert record["hyperparameters"] == {"lr": 1e-4, "epochs": 3}
    assert record["metrics"] == {"acc": 0.91} and record["labels"] == {"team": "nlp"}
    assert record["dataset"] == {"version": "v3", "digest": None}
    assert record["base_model"]["id"] == "tiny-llama" and record["base_model"]["revision"] == "main"
    assert record["known_risks"] == ["may hallucinate"] and record["license"] == "apache-2.0"
    assert shown["lineage"]["parents"] == [] and shown["aliases"] == ["candidate"]

    code, out, _ = run(capsys, "show", "org/demo", "--store", store)  # human rendering
    assert code == 0 and "adapter_model.safetensors" in out and data["digest"] in out
    code, out, _ = run(capsys, "ls", "--store", store)
    assert code == 0 and "org/demo" in out and "candidate" in out


def test_second_push_stores_no_new_bytes(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "a")
    first = push(capsys, store, adapter, "demo")
    blobs_before = tree_bytes(store / "blobs")
    files_before = sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file())
    second = push(capsys, store, adapter, "demo")
    assert second["push"]["created"] is False and second["push"]["new_bytes"] == 0
    assert second["digest"] == first["digest"]
    assert tree_bytes(store / "blobs") == blobs_before
    assert sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file()) == files_before
    code, listing = run_json(capsys, "ls", "demo", "--store", store)
    assert len(listing["names"][0]["versions"]) == 1


def test_verify_catches_flipped_byte_and_missing_blob(tmp_path, store, capsys):
    data = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    assert run_json(capsys, "verify", "--all", "--store", store)[0] == 0
    weights = next(f for f in data["files"] if f["path"] == "adapter_model.safetensors")
    path = blob(store, weights["digest"])
    make_writable(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))

    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 3
    assert [p["digest"] for p in report["problems"]] == [weights["digest"]]
    assert report["exit_code"] == 3
    code, out, err = run(capsys, "verify", "demo", "--store", store)
    assert code == 3 and weights["digest"] in out + err and "error:" in err

    path.unlink()
    code, report = run_json(capsys, "verify", "--store", store)
    assert code == 3 and report["problems"][0]["digest"] == weights["digest"]


def test_audit_verify_catches_edited_line(tmp_path, store, capsys):
    a = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    push(capsys, store, write_synthetic_adapter(tmp_path / "b", seed=1), "demo")
    assert run_json(capsys, "alias", "set", "demo:candidate", a["ref"], "--store", store)[0] == 0
    code, log = run_json(capsys, "audit", "log", "--store", store)
    assert code == 0 and [e["action"] for e in log["entries"]][-3:] == ["push", "push", "alias"]
    code, log = run_json(capsys, "audit", "log", "--limit", "1", "--store", store)
    assert len(log["entries"]) == 1
    assert run_json(capsys, "audit", "verify", "--store", store)[0] == 0

    log_path = store / "audit" / "log.jsonl"
    original = log_path.read_text().splitlines(keepends=True)
    entry = json.loads(original[1])
    entry["actor"] = "mallory"
    edited = [*original]
    edited[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    make_writable(log_path)
    log_path.write_text("".join(edited))

    code, report = run_json(capsys, "audit", "verify", "--store", store)
    assert code == 3 and report["exit_code"] == 3 and report["ok"] is False
    assert report["problems"][0]["line"] == 2
    code, _, err = run(capsys, "audit", "verify", "--store", store)
    assert code == 3 and "error: audit log line 2:" in err

    swapped = [*original]
    swapped[1], swapped[2] = original[2], original[1]
    log_path.write_text("".join(swapped))
    code, _, err = run(capsys, "audit", "verify", "--store", store)
    assert code == 3 and "error: audit log line 2:" in err
    log_path.write_text("".join(original))
    assert run_json(capsys, "audit", "verify", "--store", store)[0] == 0


@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a/../../x", "a\\b"])
def test_bad_name_refused(tmp_path, store, capsys, bad):
    adapter = write_synthetic_adapter(tmp_path / "a")
    code, out, err = run(capsys, "push", adapter, "--name", bad, "--store", store)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("fix:")
    assert "invalid name" in lines[0] and out == ""
    assert not list((store / "names").rglob("*")) and not (tmp_path / "x").exists()


def test_pickle_adapter_refused_with_fix(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "a", pickle=True)
    code, _, err = run(capsys, "push", adapter, "--name", "demo", "--store", store)
    assert code == 2 and "--allow-pickle" in err
    code, data = run_json(capsys, "push", adapter, "--name", "demo", "--store", store)
    assert code == 2 and "--allow-pickle" in data["fix"]


def test_base_fingerprint_and_shape_mismatch(tmp_path, store, capsys):
    base = write_synthetic_base(tmp_path / "base", hidden=16)
    code, fp = run_json(capsys, "fingerprint", base)
    assert code == 0 and fp["struct_digest"].startswith("sha256:")
    assert fp["weights_digest"].startswith("sha256:")
    code, fp_struct = run_json(capsys, "fingerprint", base, "--no-weights")
    assert fp_struct["struct_digest"] == fp["struct_digest"] and fp_struct["weights_digest"] is None
    code, out, _ = run(capsys, "fingerprint", base)
    assert fp["struct_digest"] in out and fp["weights_digest"] in out

    good = push(capsys, store, write_synthetic_adapter(tmp_path / "good", hidden=16), "demo",
                "--base", str(base))
    code, shown = run_json(capsys, "show", good["ref"], "--store", store)
    assert shown["record"]["base_model"]["fingerprint"] == {
        "struct_digest": fp["struct_digest"], "weights_digest": fp["weights_digest"]}

    wide = write_synthetic_adapter(tmp_path / "wide", hidden=24)
    code, _, err = run(capsys, "push", wide, "--name", "demo", "--base", base, "--store", store)
    assert code == 2 and "layers.0.self_attn.q_proj" in err.splitlines()[0]
    assert "(24, 24)" in err and "(16, 16)" in err
    code, listing = run_json(capsys, "ls", "demo", "--store", store)
    assert len(listing["names"][0]["versions"]) == 1


def test_alias_compare_and_swap(tmp_path, store, capsys):
    a = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    b = push(capsys, store, write_synthetic_adapter(tmp_path / "b", seed=1), "demo")
    s = ["--store", str(store)]
    code, moved = run_json(capsys, "alias", "set", "demo:stable", a["ref"], "--expect", "none", *s)
    assert code == 0 and moved == {"name": "demo", "alias": "stable", "old": None, "new": a["digest"]}
    # someone else already created it: "must not exist" loses
    code, err = run_json(capsys, "alias", "set", "demo:stable", b["ref"], "--expect", "none", *s)
    assert code == 4 and err["exit_code"] == 4
    # stale expectation loses, correct one wins (full digest and short prefix both work)
    code, _ = run_json(capsys, "alias", "set", "demo:stable", b["ref"], "--expect", b["digest"], *s)
    assert code == 4
    short = a["digest"].split(":")[1][:12]
    code, moved = run_json(capsys, "tag", "demo:stable", b["ref"], "--expect", short, *s)
    assert code == 0 and moved["old"] == a["digest"] and moved["new"] == b["digest"]
    code, _, err = run(capsys, "alias", "set", "demo:stable", a["ref"], "--expect", a["digest"], *s)
    assert code == 4 and err.startswith("error:")

    code, listing = run_json(capsys, "alias", "ls", "demo", *s)
    assert code == 0 and listing["aliases"] == {"stable": b["digest"]}
    code, removed = run_json(capsys, "alias", "rm", "demo:stable", *s)
    assert code == 0 and removed["old"] == b["digest"]
    assert run_json(capsys, "alias", "ls", "demo", *s)[1]["aliases"] == {}
    assert run(capsys, "alias", "set", "demo", a["ref"], *s)[0] == 2  # no :ALIAS
    # an unknown name is not an empty listing (found by a QA pass: `ls` said 5, `alias ls` 0)
    assert run_json(capsys, "alias", "ls", "nope", *s)[0] == 5
    assert run_json(capsys, "alias", "history", "nope:x", *s)[0] == 5
    assert run_json(capsys, "alias", "history", "demo:never", *s)[1]["history"] == []
    # "release" is protected: only a passing gate (promote) moves it, and push checks first
    assert run_json(capsys, "alias", "set", "demo:release", a["ref"], *s)[0] == 1
    adapter_c = write_synthetic_adapter(tmp_path / "c", seed=2)
    code, err = run_json(capsys, "push", adapter_c, "--name", "demo", "--alias", "release", *s)
    assert code == 1 and "promote" in err["fix"]
    assert len(run_json(capsys, "ls", "demo", *s)[1]["names"][0]["versions"]) == 2


def test_unknown_refs_exit_5(tmp_path, store, capsys):
    push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    for ref in ("nope", "demo:stable", "demo@ffffffffffff", "sha256:" + "f" * 64):
        code, err = run_json(capsys, "show", ref, "--store", store)
        assert code == 5 and err["exit_code"] == 5, ref
    code, _, err = run(capsys, "show", "nope", "--store", store)
    assert code == 5 and err.startswith("error:")
    assert run(capsys, "ls", "--store", tmp_path / "no-store")[0] == 5


def test_diff(tmp_path, store, capsys):
    a = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo", "--metric", "acc=0.5")
    b = push(capsys, store, write_synthetic_adapter(tmp_path / "b", seed=1), "demo",
             "--metric", "acc=0.7")
    code, d = run_json(capsys, "diff", a["ref"], b["ref"], "--store", store)
    assert code == 0 and d["same"] is False
    status = {f["path"]: f["status"] for f in d["files"]}
    assert status == {"adapter_config.json": "same", "adapter_model.safetensors": "changed"}
    changed = {r["key"]: (r["a"], r["b"]) for r in d["record"]}
    assert changed["metrics.acc"] == (0.5, 0.7) and "created" in changed
    assert "peft.r" not in changed
    code, same = run_json(capsys, "diff", a["ref"], a["ref"], "--store", store)
    assert same["same"] is True and same["record"] == []
    code, out, _ = run(capsys, "diff", a["ref"], b["ref"], "--store", store)
    assert code == 0 and "changed" in out


def test_gc_removes_only_old_unreachable_blobs(tmp_path, store, capsys):
    data = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    blobs = store / "blobs" / "sha256"
    old, young = blobs / ("0" * 64), blobs / ("1" * 64)
    old.write_bytes(b"orphan old")
    young.write_bytes(b"orphan young")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    code, dry = run_json(capsys, "gc", "--dry-run", "--store", store)
    assert code == 0 and old.exists() and young.exists()
    assert dry["removed"] == ["sha256:" + "0" * 64] and dry["dry_run"] is True
    assert dry["kept_young"] == ["sha256:" + "1" * 64]
    code, done = run_json(capsys, "gc", "--grace", "1h", "--store", store)
    assert code == 0 and not old.exists() and young.exists()
    code, done = run_json(capsys, "gc", "--grace", "0s", "--store", store)
    assert code == 0 and not young.exists()
    for f in data["files"]:
        assert blob(store, f["digest"]).exists()
    assert run_json(capsys, "verify", "--all", "--store", store)[0] == 0
    assert run(capsys, "gc", "--grace", "soon", "--store", store)[0] == 2


def test_lineage_up_and_down(tmp_path, store, capsys):
    from registry.ingest import prepare_adapter
    from registry.record import build_record
    from registry.storage.store import Store

    a = push(capsys, store, write_synthetic_adapter(tmp_path / "a"), "demo")
    st = Store.open(store)
    prepared = prepare_adapter(write_synthetic_adapter(tmp_path / "m", seed=7))
    record = build_record(prepared.peft_config, prepared.tensors)
    lineage = {"parents": [{"digest": a["digest"], "ref": a["ref"], "role": "input", "weight": 0.5}],
               "recipe": {"method": "linear", "parameters": {}, "tool": "adapterkit",
                          "tool_version": "0.1.0"}}
    child = st.push("merged", prepared.files, record, lineage=lineage).version

    code, up = run_json(capsys, "lineage", child.ref, "--up", "--store", store)
    assert code == 0 and up["digest"] == child.digest and up["method"] == "linear"
    assert [(c["digest"], c["role"], c["weight"]) for c in up["children"]] == \
        [(a["digest"], "input", 0.5)]
    code, down = run_json(capsys, "lineage", a["ref"], "--down", "--store", store)
    assert code == 0 and [c["digest"] for c in down["children"]] == [child.digest]
    code, out, _ = run(capsys, "lineage", child.ref, "--store", store)
    assert code == 0 and f"demo@{a['digest'][7:19]}" in out and "linear" in out
    code, out, _ = run(capsys, "lineage", child.ref, "--format", "dot", "--store", store)
    assert code == 0 and out.startswith("digraph")
    assert f'"{a["digest"]}" -> "{child.digest}"' in out
    code, as_json, _ = run(capsys, "lineage", child.ref, "--format", "json", "--store", store)
    assert json.loads(as_json) == up
    code, shown = run_json(capsys, "show", a["ref"], "--store", store)
    assert shown["lineage"]["children"] == [child.ref]
    code, shown = run_json(capsys, "show", child.ref, "--store", store)
    assert shown["lineage"]["parents"][0]["digest"] == a["digest"]
    assert shown["lineage"]["recipe"]["method"] == "linear"
    assert run(capsys, "lineage", child.ref, "--up", "--down", "--store", store)[0] == 2
    assert run(capsys, "lineage", child.ref, "--format", "svg", "--store", store)[0] == 2


def test_export_writes_plain_peft_dir(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "a")
    data = push(capsys, store, adapter, "demo", "--base-model", "org/tiny-llama")
    out_dir = tmp_path / "exported"
    code, exported = run_json(capsys, "export", "demo", out_dir, "--store", store)
    assert code == 0 and exported["ref"] == data["ref"]
    assert (out_dir / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    readme = (out_dir / "README.md").read_text()
    assert readme.startswith("---\n") and "base_model_relation: adapter" in readme


def test_default_store_from_env(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home-store"
    monkeypatch.setenv("ADAPTERS_HOME", str(home))
    code, data = run_json(capsys, "init")
    assert code == 0 and Path(data["root"]) == home and (home / "oci-layout").exists()
    push(capsys, home, write_synthetic_adapter(tmp_path / "a"), "demo")
    code, listing = run_json(capsys, "ls")
    assert [e["name"] for e in listing["names"]] == ["demo"]


def test_usage_errors_exit_2(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "a")
    code, _, err = run(capsys, "push", adapter, "--store", store)  # --name missing
    assert code == 2 and "--name" in err
    assert run(capsys, "ls", "--bogus", "--store", store)[0] == 2
    assert run(capsys, "audit", "log", "--limit", "many", "--store", store)[0] == 2
    code, _, err = run(capsys, "push", adapter, "--name", "demo", "--hparam", "lr", "--store", store)
    assert code == 2 and "KEY=VALUE" in err


def test_every_command_has_json_and_store_options(capsys):
    commands = ["init", "push", "ls", "show", "diff", "fingerprint", "tag", "lineage", "verify",
                "gc", "export", "alias set", "alias rm", "alias ls", "audit log", "audit verify"]
    for command in commands:
        code, out, _ = run(capsys, *command.split(), "--help")
        assert code == 0 and "--json" in out and "--store" in out, command


def test_cli_never_imports_torch(tmp_path):
    """`adapters --help` and every registry command run without torch/transformers/peft."""
    proc = subprocess.run([sys.executable, "-m", "cli.main", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "push" in proc.stdout
    assert heavy_modules_after("import cli.main", ROOT) == []

    adapter = write_synthetic_adapter(tmp_path / "a")
    base = write_synthetic_base(tmp_path / "base")
    s = str(tmp_path / "store")
    steps = [
        ["init", "--store", s],
        ["push", str(adapter), "--name", "demo", "--alias", "candidate", "--base", str(base),
         "--store", s],
        ["ls", "--store", s], ["show", "demo", "--store", s], ["diff", "demo", "demo", "--store", s],
        ["fingerprint", str(base)], ["alias", "ls", "demo", "--store", s],
        ["tag", "demo:stable", "demo", "--store", s], ["lineage", "demo", "--store", s],
        ["verify", "--all", "--store", s], ["gc", "--dry-run", "--store", s],
        ["audit", "log", "--store", s], ["audit", "verify", "--store", s],
        ["export", "demo", str(tmp_path / "out"), "--store", s],
    ]
    code = "from cli.main import main\nassert main(['--help']) == 0\n" + "".join(
        f"assert main({step!r} + ['--json']) == 0, {step!r}\n" for step in steps
    )
    assert heavy_modules_after(code, ROOT) == []


def test_layer_restrictions_are_record_fields(tmp_path, store, capsys):
    adapter = write_synthetic_adapter(tmp_path / "layers")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update({"layers_to_transform": [1], "layers_pattern": "layers"})
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    data = push(capsys, store, adapter, "restricted")
    code, shown = run_json(capsys, "show", data["ref"], "--store", store)
    assert code == 0
    assert shown["record"]["peft"]["layers_to_transform"] == [1]
    assert shown["record"]["peft"]["layers_pattern"] == "layers"
    code, text, _ = run(capsys, "show", data["ref"], "--store", store)
    assert code == 0 and "layers_to_transform" in text
    # a bad value is refused with the field named, nothing stored
    config["layers_to_transform"] = ["one"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, err = run_json(capsys, "push", adapter, "--name", "bad", "--store", store)
    assert code == 2 and "record.peft.layers_to_transform[0]" in err["message"]


def test_delete_unbinds_a_version_by_digest_audited(tmp_path, capsys) -> None:
    from registry.storage.store import Store
    from tests.support.registry import make_adapter_dir, push_adapter

    store = Store.open(tmp_path / "store", create=True)
    v1 = push_adapter(store, "lora", make_adapter_dir(tmp_path / "a", seed=1)).version
    v2 = push_adapter(store, "lora", make_adapter_dir(tmp_path / "b", seed=2)).version
    store.set_alias("lora", "candidate", v2.digest)
    root = ["--store", str(store.root)]
    code, data = run_json(capsys, "delete", "lora", *root)
    assert code == 2 and "NAME@sha256" in data["message"]
    code, data = run_json(capsys, "delete", v2.ref, *root)
    assert code == 4 and "candidate" in data["message"]          # an alias still points at it
    code, data = run_json(capsys, "delete", v1.ref, *root)
    assert code == 0 and data["deleted"] == v1.ref
    assert [v.digest for v in store.versions("lora")] == [v2.digest]
    assert store.audit().entries()[-1]["action"] == "delete"
    code, report = run_json(capsys, "verify", "--all", *root)
    assert code == 0, report                                      # the log explains it
    code, data = run_json(capsys, "delete", v1.ref, *root)
    assert code == 5


def test_alias_history_shows_a_rolled_back_move(tmp_path, capsys) -> None:
    # found by a QA pass: a `recover` entry (a move whose writer died) has dict-valued old/new,
    # and the history table crashed on it (exit 70)
    from registry.storage.store import Store
    from tests.support.registry import make_adapter_dir, push_adapter

    store = Store.open(tmp_path / "store", create=True)
    version = push_adapter(store, "a", make_adapter_dir(tmp_path / "a")).version
    store.set_alias("a", "dev", version.digest)
    moved = store.audit().entries()[-1]
    store.audit().append("recover", "a:dev", old={"seq": moved["seq"], "hash": moved["hash"]},
                         new={"outcome": "rolled_back", "reason": "the writer died"})
    code, out, err = run(capsys, "alias", "history", "a:dev", "--store", str(store.root))
    assert code == 0 and "recover" in out, err
    code, data = run_json(capsys, "alias", "history", "a:dev", "--store", str(store.root))
    assert code == 0
    assert data["history"][-1]["reason"] == f"rolled_back: seq {moved['seq']} (the writer died)"
