"""Hostile command-line values found by a CLI fuzz pass: each gets exit 2 (or 5/6) and one
error line, and nothing is written.

* bytes that are not UTF-8 in an argument or ``$ADAPTERS_ACTOR`` crashed (exit 70) half way:
  ``init`` left a directory that was no store, ``push`` orphan blobs;
* a key or checkpoint file that is a FIFO hung the command, ``/dev/zero`` filled memory;
* ``init gs://`` (``Path`` folds it to ``gs:``) created a local directory ``gs:``;
* errors came out as JSON whenever an argument *value* read ``--json``;
* ``push-hub`` echoed a 100,000-character ref before checking it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.registry import make_adapter_dir

BAD = "st\udcff"  # what Python makes of the byte 0xff in argv


@pytest.fixture()
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "store"
    assert run(capsys, "init", root)[0] == 0
    make_adapter_dir(tmp_path / "ad")
    assert run(capsys, "push", tmp_path / "ad", "--name", "a", "--store", root)[0] == 0
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _one_error(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "fix"], err
    assert fragment in lines[0], err


def test_a_non_utf8_argument_is_refused_before_anything_is_created(tmp_path, capsys):
    code, _, err = run(capsys, "init", tmp_path / BAD)
    assert code == 2
    _one_error(err, "is not valid UTF-8 text")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--license", "--label"])
def test_a_non_utf8_value_leaves_no_orphan_blob(store, tmp_path, capsys, option):
    before = _files(store)
    value = "mit\udcff" if option == "--license" else "k=v\udcff"
    code, _, err = run(capsys, "push", tmp_path / "ad", "--name", "b", option, value, "--store", store)
    assert code == 2 and _files(store) == before
    _one_error(err, "is not valid UTF-8 text")


def test_a_non_utf8_actor_is_refused(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTERS_ACTOR", "bob\udcff")
    before = _files(store)
    code, _, err = run(capsys, "push", tmp_path / "ad", "--name", "b", "--store", store)
    assert code == 2 and _files(store) == before
    _one_error(err, "$ADAPTERS_ACTOR is not valid UTF-8 text")


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "dir"])
def test_key_and_checkpoint_files_must_be_regular_files(store, tmp_path, capsys, fifo, special):
    path = {"fifo": fifo, "/dev/zero": Path("/dev/zero"), "dir": tmp_path}[special]
    for args in (["sign", "a", "--key", path], ["verify", "--all", "--signatures", "--trusted-keys", path],
                 ["audit", "verify", "--checkpoint", path, "--trusted-keys", path],
                 ["audit", "checkpoint", "--key", path, "--out", tmp_path / "cp.json"]):
        if special == "dir" and "--trusted-keys" in args:
            continue  # a directory of trusted keys is allowed
        code, _, err = run(capsys, *args, "--store", store)  # returns: no hang, no MemoryError
        assert code == 2, (args, err)
        assert "is not a regular file" in err, (args, err)


def test_an_oversized_key_file_is_refused(store, tmp_path, capsys):
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    code, _, err = run(capsys, "sign", "a", "--key", big, "--store", store)
    assert code == 2
    _one_error(err, "is larger than 1048576 bytes")


@pytest.mark.parametrize("location", ["gs://", "S3://", "hf://", "gs:", "s3:///bucket/p"])
def test_url_like_store_locations_create_no_local_directory(tmp_path, capsys, monkeypatch, location):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "init", location)
    assert code == 2 and list(tmp_path.iterdir()) == [], err


def test_a_value_that_reads_json_does_not_switch_errors_to_json(store, tmp_path, capsys):
    code, out, err = run(capsys, "push", tmp_path / "missing", "--name", "x", "--license", "--json",
                         "--store", store)
    assert code == 5 and out == "" and err.startswith("error: ")
    code, out, err = run(capsys, "show", "--store", store, "--", "--json")
    assert code == 2 and out == "" and err.startswith("error: invalid name '--json'")
    code, out, _ = run(capsys, "show", "nope", "--store", store, "--json")
    assert code == 5 and '"exit_code": 5' in out  # the real flag still gives JSON


def test_push_hub_does_not_echo_an_unchecked_ref(store, capsys):
    code, out, err = run(capsys, "push-hub", "a" * 100_000, "org/name", "--store", store)
    assert code == 2 and len(out) + len(err) < 2000 and "uploading" not in out + err  # name too long
