"""`adapters rebuild` and `adapters verify REF --model DIR` on the tiny Llama.

Derived models are recorded by reference; these tests show the record is enough to
prove a directory: a rebuild of an unload, of an nf4 quantization of that unload
(unload then quantize, through the lineage) and of a one-pass ``unload --quantize``
is bit-identical to what was recorded; a flipped byte in a deployed copy is named by
tensor (exit 3); a rebuild that would differ is refused naming the tensor and leaves
no output; a non-empty ``--out`` is refused (exit 4) with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from registry.digests import is_digest
from registry.formats.fingerprint import fingerprint_model
from registry.formats.safetensors_header import read_header
from tests.support.cli import run, run_json
from tests.support.unload import make_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def recorded(work: Path, base: Path) -> dict:
    """A store with an adapter, its unload, an nf4 quantization of the unload and a
    one-pass ``unload --quantize nf4 --double-quant``."""
    from cli.main import main

    store = work / "store"
    adapter = make_adapter(base, work / "adapter", r=4, alpha=8)

    def cli(*args: str | Path) -> dict:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main([str(a) for a in (*args, "--store", store, "--json")])
        assert code == 0, buf.getvalue()
        return json.loads(buf.getvalue())

    cli("init")
    cli("push", adapter, "--name", "demo", "--base", base)
    unloaded = cli("unload", "demo", "--base", base, "--out", work / "unloaded")
    nf4 = cli("quantize", work / "unloaded", "--to", "nf4", "--out", work / "nf4",
              "--name", "demo-nf4")
    once = cli("unload", "demo", "--base", base, "--out", work / "once", "--quantize", "nf4",
               "--double-quant", "--name", "demo-once")
    return {"store": store, "unloaded": unloaded["version"], "nf4": nf4["version"],
            "once": once["version"]}


def _store(recorded: dict):
    from registry.storage.store import Store

    return Store.open(recorded["store"])


def test_lineage_records_what_a_rebuild_needs(recorded: dict) -> None:
    st = _store(recorded)
    nf4 = st.resolve(recorded["nf4"]["ref"])
    assert [(p["role"], p["digest"]) for p in nf4.lineage["parents"]] == \
        [("source", recorded["unloaded"]["digest"])]
    params = nf4.lineage["recipe"]["parameters"]
    assert params["quantization"]["method"] == "nf4" and "bf16_gemm" in params
    env = nf4.lineage["report"]["environment"]
    assert {"adapterkit", "torch", "transformers", "bitsandbytes", "safetensors"} <= set(env)
    # the tensor list is stored under the weights digest itself
    weights = nf4.record["weights"]["weights_digest"]
    with st.open_blob(weights) as handle:
        assert len(json.load(handle)["tensors"]) == nf4.record["tensors"]["count"]


@pytest.mark.parametrize("which, steps", [("unloaded", ["unload"]),
                                          ("nf4", ["unload", "quantize"]),
                                          ("once", ["unload"])])
def test_rebuild_is_bit_identical(recorded: dict, work: Path, base: Path, capsys,
                                  which: str, steps: list[str]) -> None:
    out = work / f"rebuilt-{which}"
    code, data = run_json(capsys, "rebuild", recorded[which]["ref"], "--base", base,
                          "--out", out, "--store", recorded["store"])
    assert code == 0, data
    assert [s["method"] for s in data["steps"]] == steps
    assert data["environment_differences"] == []
    st = _store(recorded)
    want = st.resolve(recorded[which]["ref"]).record["weights"]
    assert fingerprint_model(out).to_json() == want
    assert not [p for p in work.iterdir() if p.name.startswith(f".rebuilt-{which}.rebuild-")]
    code, text, _ = run(capsys, "verify", recorded[which]["ref"], "--model", out,
                        "--store", recorded["store"])
    assert code == 0 and text.startswith("OK: ") and len(text.strip().splitlines()) == 1


def test_a_killed_rebuilds_scratch_is_removed_once_idle(recorded: dict, work: Path, base: Path,
                                                       capsys) -> None:
    # found by a QA pass: a rebuild killed mid-way left .OUT.rebuild-* (partial model
    # copies) for good; the next rebuild into the same OUT removes it once idle an hour
    import os
    import time

    stale = work / ".rebuilt-stale.rebuild-abcd1234"
    (stale / "step-0").mkdir(parents=True)
    (stale / "step-0" / "model.safetensors").write_bytes(b"partial")
    fresh = work / ".rebuilt-stale.rebuild-wxyz5678"
    fresh.mkdir()
    old = time.time() - 2 * 3600
    for path in (stale / "step-0" / "model.safetensors", stale / "step-0", stale):
        os.utime(path, (old, old))
    code, data = run_json(capsys, "rebuild", recorded["unloaded"]["ref"], "--base", base,
                          "--out", work / "rebuilt-stale", "--store", recorded["store"])
    assert code == 0, data
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a running rebuild


def test_an_edited_config_beside_the_recorded_weights_is_another_model(recorded: dict, work: Path,
                                                                       base: Path, capsys) -> None:
    # found by a QA pass: the record bound the weights only, so a deployed copy whose
    # config.json said relu / another rms_norm_eps verified, and gated (by ref or by path)
    # as that version
    for which in ("unloaded", "nf4"):
        assert is_digest(_store(recorded).resolve(recorded[which]["ref"]).record["config"])
    deployed = work / "deployed-config"
    shutil.copytree(work / "unloaded", deployed)
    ref = recorded["unloaded"]["ref"]
    config = json.loads((deployed / "config.json").read_text())
    (deployed / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))
    code, _, _ = run(capsys, "verify", ref, "--model", deployed, "--store", recorded["store"])
    assert code == 0  # which transformers wrote it is not what it says
    (deployed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5,
                                                      "hidden_act": "relu"}))
    code, err = run_json(capsys, "verify", ref, "--model", deployed, "--store", recorded["store"])
    assert code == 3 and "config.json" in err["message"] and "architecture" in err["message"]
    policy = work / "config-gate.yaml"
    policy.write_text("version: 1\nchecks:\n  - kind: structural\n")
    for target in (["gate", ref, "--model", deployed], ["gate", deployed]):
        code, err = run_json(capsys, *target, "--base", base, "--policy", policy,
                             "--store", recorded["store"])
        assert code == 3 and "config.json" in err["message"], err
    (deployed / "config.json").unlink()
    code, err = run_json(capsys, "verify", ref, "--model", deployed, "--store", recorded["store"])
    assert code == 3 and "is missing" in err["message"]


def test_a_directory_is_matched_by_weights_and_config(recorded: dict, work: Path, base: Path,
                                                      capsys) -> None:
    # found by a QA pass: two records with the same weights (the same adapter unloaded onto
    # bases that differ only in config.json); gating an untouched copy of the first matched
    # the newest record by weights alone, then failed its config check (exit 3)
    other_base = work / "base-other-config"
    shutil.copytree(base, other_base)
    config = json.loads((other_base / "config.json").read_text())
    config["max_position_embeddings"] = 2 * config.get("max_position_embeddings", 64)
    (other_base / "config.json").write_text(json.dumps(config))
    code, other = run_json(capsys, "unload", "demo", "--base", other_base, "--out",
                           work / "unloaded-other-config", "--name", "demo-ctx",
                           "--store", recorded["store"])
    assert code == 0, other
    copy = work / "unloaded-copy"
    shutil.copytree(work / "unloaded", copy)
    policy = work / "match-gate.yaml"
    policy.write_text("version: 1\nchecks:\n  - kind: structural\n")
    code, data = run_json(capsys, "gate", copy, "--base", base, "--policy", policy,
                          "--store", recorded["store"])
    assert code == 0, data
    assert data["candidate_digest"] == recorded["unloaded"]["digest"]


def test_flipped_byte_in_deployed_dir_is_named(recorded: dict, work: Path, capsys) -> None:
    deployed = work / "deployed"
    shutil.copytree(work / "nf4", deployed)
    weights = deployed / "model.safetensors"
    header = read_header(weights)
    name = "model.layers.1.mlp.down_proj.weight.absmax"
    info = header.tensors[name]
    data = bytearray(weights.read_bytes())
    data[header.data_offset + info.start + 1] ^= 0x01
    weights.write_bytes(bytes(data))
    code, err = run_json(capsys, "verify", recorded["nf4"]["ref"], "--model", deployed,
                         "--store", recorded["store"])
    assert code == 3 and err["error"] == "IntegrityError"
    assert f"tensor {name} has other bytes" in err["message"]
    code, _, text = run(capsys, "verify", recorded["nf4"]["ref"], "--model", deployed,
                        "--store", recorded["store"])
    assert code == 3 and name in text and text.startswith("error: ")
    # an adapter version has no --model to check
    code, err = run_json(capsys, "verify", "demo", "--model", deployed,
                         "--store", recorded["store"])
    assert code == 2 and "not a derived model" in err["message"]


def test_rebuild_into_non_empty_out_is_refused(recorded: dict, work: Path, base: Path,
                                              capsys) -> None:
    out = work / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    code, err = run_json(capsys, "rebuild", recorded["nf4"]["ref"], "--base", base,
                         "--out", out, "--store", recorded["store"])
    assert code == 4 and err["error"] == "ConflictError"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in work.iterdir() if p.name.startswith(".occupied.rebuild-")]


def test_rebuild_that_differs_names_the_tensor_and_writes_nothing(
        recorded: dict, work: Path, base: Path, capsys, monkeypatch) -> None:
    from merging.model import rebuild as rebuild_mod

    real = rebuild_mod._spec

    def wrong_blocksize(data):  # a recipe replayed with another block size
        spec = real(data)
        return None if spec is None else type(spec)(spec.method, spec.double_quant, 128)

    monkeypatch.setattr(rebuild_mod, "_spec", wrong_blocksize)
    out = work / "differs"
    code, err = run_json(capsys, "rebuild", recorded["nf4"]["ref"], "--base", base,
                         "--out", out, "--store", recorded["store"])
    assert code == 3 and err["error"] == "IntegrityError"
    assert "not bit-identical" in err["message"] and "tensor model.layers." in err["message"]
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".differs.rebuild-")]


def test_rebuild_refuses_the_wrong_base_and_non_derived(recorded: dict, work: Path,
                                                        capsys) -> None:
    from tests.support.unload import make_base

    other = make_base(work / "other-base", seed=7)
    code, err = run_json(capsys, "rebuild", recorded["unloaded"]["ref"], "--base", other,
                         "--out", work / "wrong-base", "--store", recorded["store"])
    assert code == 2 and err["error"] == "BaseMismatchError"
    assert not (work / "wrong-base").exists()
    code, err = run_json(capsys, "rebuild", "demo", "--base", other,
                         "--out", work / "not-derived", "--store", recorded["store"])
    assert code == 2 and "not a derived model" in err["message"]
