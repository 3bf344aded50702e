"""Signed audit checkpoints: a rewrite with every hash recomputed is still caught.

The attacker here has write access to the store: they edit an old entry and
recompute the whole chain and head, so plain ``audit verify`` passes. A checkpoint
signed before the rewrite (and kept outside the store) makes ``audit verify
--checkpoint`` fail with exit 3; so does cutting the log below it, an altered
checkpoint file, or one signed by a key the verifier does not trust.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.audit.chain import entry_hash
from registry.digests import canonical_json
from tests.support.cli import run, run_json, write_synthetic_adapter


@pytest.fixture()
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    store = tmp_path / "store"
    assert run_json(capsys, "init", "--store", store)[0] == 0
    for i in range(3):
        adapter = write_synthetic_adapter(tmp_path / f"a{i}", seed=i)
        assert run_json(capsys, "push", adapter, "--name", f"n{i}", "--store", store)[0] == 0
    keys = {}
    for label in ("auditor", "stranger"):
        code, _ = run_json(capsys, "keygen", tmp_path / f"{label}.pem", tmp_path / f"{label}.pub")
        assert code == 0
        keys[label] = tmp_path / label
    return {"store": store, "tmp": tmp_path, **keys}


def _checkpoint(capsys, w: dict[str, Path], key: str, name: str) -> tuple[Path, dict]:
    out = w["tmp"] / name
    code, data = run_json(capsys, "audit", "checkpoint", "--key", f"{w[key]}.pem", "--out", out,
                          "--store", w["store"])
    assert code == 0, data
    return out, data


def _verify(capsys, w: dict[str, Path], checkpoint: Path, key: str = "auditor") -> tuple[int, dict]:
    return run_json(capsys, "audit", "verify", "--checkpoint", checkpoint,
                    "--trusted-keys", f"{w[key]}.pub", "--store", w["store"])


def _rewrite(store: Path, edit: int | None = None, keep: int | None = None) -> None:
    """Edit entry ``edit`` (1-based) and/or keep only ``keep`` entries, then recompute
    every hash and the head: a rewrite the chain alone cannot see."""
    log, head = store / "audit" / "log.jsonl", store / "audit" / "head.json"
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    entries = entries[:keep] if keep is not None else entries
    prev = None
    for entry in entries:
        if entry["seq"] == edit:
            entry["actor"] = "someone-else"
        entry["prev_hash"] = prev
        entry["hash"] = entry_hash(entry)
        prev = entry["hash"]
    for path in (log, head):
        path.chmod(0o644)
    log.write_bytes(b"".join(canonical_json(e) + b"\n" for e in entries))
    head.write_bytes(canonical_json({"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}))


def test_checkpoint_verifies_and_is_itself_audited(world, capsys) -> None:
    out, data = _checkpoint(capsys, world, "auditor", "cp1.json")
    assert data["seq"] >= 3 and data["hash"].startswith("sha256:")
    code, report = _verify(capsys, world, out)
    assert code == 0 and report["checkpoints"] == [{"file": str(out), "seq": data["seq"], "ok": True}]
    code, log = run_json(capsys, "audit", "log", "--store", world["store"])
    assert log["entries"][-1]["action"] == "checkpoint"
    assert log["entries"][-1]["new"]["seq"] == data["seq"]
    # a second checkpoint never overwrites the first
    code, err = run_json(capsys, "audit", "checkpoint", "--key", f"{world['auditor']}.pem",
                         "--out", out, "--store", world["store"])
    assert code == 4 and "already exists" in err["message"]


def test_rewritten_history_fails_against_the_checkpoint(world, capsys) -> None:
    out, data = _checkpoint(capsys, world, "auditor", "cp.json")
    _rewrite(world["store"], edit=2)
    assert run_json(capsys, "audit", "verify", "--store", world["store"])[0] == 0  # chain alone: fine
    code, report = _verify(capsys, world, out)
    assert code == 3 and "history rewritten" in report["message"]
    code, _, err = run(capsys, "audit", "verify", "--checkpoint", out, "--trusted-keys",
                       f"{world['auditor']}.pub", "--store", world["store"])
    assert code == 3 and f"checkpoint seq {data['seq']}" in err


def test_log_cut_below_the_checkpoint_fails(world, capsys) -> None:
    out, _ = _checkpoint(capsys, world, "auditor", "cp.json")
    _rewrite(world["store"], keep=2)
    code, report = _verify(capsys, world, out)
    assert code == 3 and "truncated below the checkpoint" in report["message"]


def test_untrusted_or_altered_checkpoints_fail(world, capsys) -> None:
    out, _ = _checkpoint(capsys, world, "stranger", "cp-stranger.json")
    code, report = _verify(capsys, world, out)  # verifier trusts only the auditor
    assert code == 3 and "not signed by a trusted key" in report["message"]
    good, _ = _checkpoint(capsys, world, "auditor", "cp-good.json")
    envelope = json.loads(good.read_text())
    envelope["signatures"][0]["sig"] = envelope["signatures"][0]["sig"][::-1]
    altered = world["tmp"] / "cp-altered.json"
    altered.write_text(json.dumps(envelope))
    code, report = _verify(capsys, world, altered)
    assert code == 3 and "does not verify" in report["message"]


def test_bad_usage_exits_2(world, capsys) -> None:
    out, _ = _checkpoint(capsys, world, "auditor", "cp.json")
    code, err = run_json(capsys, "audit", "verify", "--checkpoint", out, "--store", world["store"])
    assert code == 2 and "trusted" in err["message"] and "--trusted-keys" in err["fix"]
    code, err = run_json(capsys, "audit", "verify", "--trusted-keys", f"{world['auditor']}.pub",
                         "--store", world["store"])
    assert code == 2 and "--checkpoint" in err["message"]
    code, err = run_json(capsys, "audit", "verify", "--checkpoint", world["tmp"] / "missing.json",
                         "--trusted-keys", f"{world['auditor']}.pub", "--store", world["store"])
    assert code == 5 and "checkpoint file" in err["message"] and "not found" in err["message"]  # not found, as a missing key
