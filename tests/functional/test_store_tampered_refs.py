"""Small hand edits of a store's refs that used to pass unnoticed (a store mutation fuzz pass).

An attacker with file access edits one small file; each test makes that edit through the
file system, runs the commands, and checks what must happen (exit code, what stays):

* a content claim naming another version made ``push`` return that version and move
  ``--alias`` onto it;
* a binding file deleted by hand let ``gc`` delete a live release's blobs for good;
* an edited binding time changed what a bare ``NAME`` resolves to, and verify was silent;
* a malformed intent marker made every writer exit 70;
* ``protected_aliases: "release"`` protected nothing, a number crashed alias moves;
* an audit line rewritten with duplicate keys (one value shown, another hashed) verified;
* a dangling symlink binding broke ``ls`` of every name; a FIFO in the store hung readers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.cli import run, run_json
from tests.support.registry import make_adapter_dir


@pytest.fixture()
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    store = tmp_path / "store"
    assert run(capsys, "init", store)[0] == 0
    a1, a2 = make_adapter_dir(tmp_path / "a1", seed=1), make_adapter_dir(tmp_path / "a2", seed=2)
    return {"store": store, "a1": a1, "a2": a2}


def _digest(capsys: pytest.CaptureFixture[str], store: Path, ref: str) -> str:
    code, shown = run_json(capsys, "show", ref, "--store", store)
    assert code == 0, shown
    return shown["digest"]


def _push(capsys: pytest.CaptureFixture[str], w: dict[str, Path], src: str, *extra: str) -> str:
    code, out = run_json(capsys, "push", w[src], "--name", "m", "--store", w["store"], *extra)
    assert code == 0, out
    return out["version"]["digest"]


def _blobs(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs" / "sha256").iterdir()}


def test_a_forged_content_claim_does_not_redirect_a_push(world, capsys):
    store = world["store"]
    d1, d2 = _push(capsys, world, "a1"), _push(capsys, world, "a2")
    claim = next(p for p in (store / "content" / "m").iterdir() if d2 in p.read_text())
    assert run(capsys, "delete", f"m@{d2}", "--store", store)[0] == 0
    claim.write_text(d1 + "\n")  # the claim of a2's content now names a1's version
    files = run_json(capsys, "show", f"m@{d1}", "--store", store)[1]["files"]
    again = _push(capsys, world, "a2", "--alias", "candidate")  # a2 bound again, not a1
    assert again != d1 and _digest(capsys, store, "m:candidate") == again
    assert run_json(capsys, "show", again, "--store", store)[1]["files"] != files


def test_gc_refuses_while_a_binding_is_missing_and_deletes_nothing(world, capsys):
    store = world["store"]
    digest = _push(capsys, world, "a1", "--alias", "candidate")
    (store / "names" / "m" / "versions" / digest[7:]).unlink()
    before = _blobs(store)
    code, _, err = run(capsys, "gc", "--grace", "0s", "--store", store)
    assert code == 3 and "refs and its audit log disagree" in err
    assert _blobs(store) == before


def test_an_edited_binding_time_is_reported(world, capsys):
    store = world["store"]
    d1 = _push(capsys, world, "a1")
    _push(capsys, world, "a2")
    (store / "names" / "m" / "versions" / d1[7:]).write_text("2099-01-01T00:00:00.000000Z\n")
    assert _digest(capsys, store, "m") == d1  # what a bare name now means...
    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 3  # ...is reported
    assert any("binding's time" in p["detail"] for p in report["problems"]), report


def test_a_reordering_binding_time_within_the_drift_is_reported(world, capsys):
    store = world["store"]
    d1 = _push(capsys, world, "a1")
    d2 = _push(capsys, world, "a2")
    later = datetime.strptime((store / "names" / "m" / "versions" / d2[7:]).read_text().strip(),
                              "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(milliseconds=1)
    (store / "names" / "m" / "versions" / d1[7:]).write_text(
        later.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "\n")  # 1 ms after d2: well within the drift
    assert _digest(capsys, store, "m") == d1
    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 3 and any("pushed later" in p["detail"] for p in report["problems"]), report


def test_a_malformed_intent_marker_blocks_no_writer_and_is_reported(world, capsys):
    store = world["store"]
    _push(capsys, world, "a1")
    marker = {"id": "1-x", "after_seq": "abc", "ts": "t", "actor": "a", "action": "push",
              "subject": "m", "old": None, "new": None}
    (store / "audit" / "pending" / "1-x").write_text(json.dumps(marker))
    assert run(capsys, "alias", "set", "m:c", "m", "--store", store)[0] == 0
    _push(capsys, world, "a2")
    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 3 and any("not a well-formed intent" in p["detail"] for p in report["problems"])


@pytest.mark.parametrize(("setting", "code"), [("release", 1), (["release"], 1), (5, 2), ([""], 2)])
def test_protected_aliases_setting_types(world, capsys, setting, code):
    store = world["store"]
    _push(capsys, world, "a1")
    config = json.loads((store / "config.json").read_text())
    (store / "config.json").write_text(json.dumps({**config, "protected_aliases": setting}))
    got, _, err = run(capsys, "alias", "set", "m:release", "m", "--store", store)
    assert got == code and "Traceback" not in err and "internal error" not in err, err


def test_an_audit_line_with_a_duplicate_key_fails_audit_verify(world, capsys):
    store = world["store"]
    _push(capsys, world, "a1", "--alias", "candidate")
    log = store / "audit" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if '"action":"alias"' in line)
    lines[i] = '{"new":"sha256:' + "e" * 64 + '","actor":"mallory",' + lines[i][1:]
    log.write_text("".join(lines))
    code, _, err = run(capsys, "audit", "verify", "--store", store)
    assert code == 3 and "duplicate key" in err + _


def test_a_dangling_symlink_binding_is_reported_and_breaks_no_listing(world, capsys):
    store = world["store"]
    digest = _push(capsys, world, "a1")
    run_json(capsys, "push", world["a2"], "--name", "n", "--store", store)
    binding = store / "names" / "m" / "versions" / digest[7:]
    binding.unlink()
    binding.symlink_to("/nonexistent/x")
    assert run(capsys, "show", "n", "--store", store)[0] == 0
    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 3 and any(p["kind"] == "removed" for p in report["problems"]), report


@pytest.mark.parametrize("where", ["binding", "head", "pending"])
def test_a_fifo_in_the_store_hangs_nothing(world, capsys, where):
    store = world["store"]
    digest = _push(capsys, world, "a1")
    path = {"binding": store / "names" / "m" / "versions" / digest[7:],
            "head": store / "audit" / "head.json",
            "pending": store / "audit" / "pending" / "1-x"}[where]
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    code, _, err = run(capsys, "verify", "--all", "--store", store)  # returns: no hang
    assert code == (0 if where == "pending" else 3), err


def test_a_clock_stepped_back_between_pushes_is_no_tampering(world, capsys, monkeypatch):
    # found by a QA pass: binding times came straight from the clock, so an NTP step back
    # (or a skewed host, or two pushes in one microsecond) broke their order: verify
    # reported tampering, gc refused, and `m` resolved to the older version
    import registry.stamps as stamps

    store = world["store"]
    _push(capsys, world, "a1")
    def half_an_hour_back() -> str:  # an NTP step back (a stamp an hour ahead would be an edit)
        return (datetime.now(timezone.utc) - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    monkeypatch.setattr(stamps, "utc_now_iso", half_an_hour_back)
    d2 = _push(capsys, world, "a2")
    assert _digest(capsys, store, "m") == d2
    assert run(capsys, "verify", "--all", "--store", store)[0] == 0
    assert run(capsys, "gc", "--store", store)[0] == 0


def test_gc_is_not_refused_by_binding_times_alone(world, capsys):
    store = world["store"]
    d1 = _push(capsys, world, "a1")
    _push(capsys, world, "a2")
    (store / "names" / "m" / "versions" / d1[7:]).write_text("2099-01-01T00:00:00.000000Z\n")
    assert run(capsys, "verify", "--all", "--store", store)[0] == 3
    assert run(capsys, "gc", "--store", store)[0] == 0  # what is reachable has not changed
