"""Smaller CLI contracts: ``init STORE``, the ref-or-directory rule, ``alias rm`` of a
missing alias, and the cleanup of temp directories a killed ``export`` left behind.

The rule (:func:`registry.ref_or_dir.resolve_ref_or_dir`, used by ``unload`` and
``gate``): a store ref wins; a directory is written as a path (``./NAME``); a bare
word that is both is refused with exit 2 naming both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from registry.errors import BadInputError, NotFoundError
from registry.export import STALE_EXPORT_GRACE_S, remove_stale_exports
from registry.ref_or_dir import resolve_ref_or_dir
from tests.support.cli import run, run_json, write_synthetic_adapter, write_synthetic_base


@pytest.fixture()
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A store holding ``demo`` (one synthetic adapter)."""
    root = tmp_path / "store"
    assert run(capsys, "init", root)[0] == 0
    adapter = write_synthetic_adapter(tmp_path / "adapter-src")
    code, _, err = run(capsys, "push", adapter, "--name", "demo", "--store", root)
    assert code == 0, err
    return root


# ---- init STORE ---------------------------------------------------------------------


def test_init_positional_directory(tmp_path, capsys):
    root = tmp_path / "positional"
    code, data = run_json(capsys, "init", root)
    assert code == 0 and Path(data["root"]) == root and (root / "oci-layout").is_file()
    assert run_json(capsys, "init", root, "--store", root)[0] == 0  # same store twice: fine
    code, data = run_json(capsys, "init", root, "--store", tmp_path / "other")
    assert code == 2 and data["error"] == "UsageError" and "two different stores" in data["message"]
    assert not (tmp_path / "other").exists()


def test_init_positional_s3(s3_store_location, capsys):
    location = s3_store_location
    code, data = run_json(capsys, "init", location)
    assert code == 0 and data["root"] == location
    code, data = run_json(capsys, "ls", "--store", location)
    assert code == 0 and data == {"names": []}


# ---- the ref-or-directory rule --------------------------------------------------------


def test_rule_in_the_library(store, tmp_path, monkeypatch):
    from registry.storage.store import Store

    st = Store.open(store)
    monkeypatch.chdir(tmp_path)
    write_synthetic_adapter(tmp_path / "demo")  # ./demo is a directory AND demo a ref
    write_synthetic_adapter(tmp_path / "only-dir")
    with pytest.raises(BadInputError, match=r"both a stored version .* and a directory") as info:
        resolve_ref_or_dir(st, "demo")
    assert "./demo" in info.value.message and "./demo" in info.value.fix
    assert resolve_ref_or_dir(st, "./demo") == Path("./demo")  # written as a path: the dir
    short = st.resolve("demo").digest.split(":")[1][:12]
    assert resolve_ref_or_dir(st, f"demo@{short}").name == "demo"  # explicit ref form
    with pytest.raises(BadInputError, match="not a version in the store") as info:
        resolve_ref_or_dir(st, "only-dir")  # a bare word is never silently a directory
    assert info.value.fix == "write ./only-dir to use the directory"
    assert resolve_ref_or_dir(st, str(tmp_path / "only-dir")) == tmp_path / "only-dir"
    assert resolve_ref_or_dir(None, "./only-dir") == Path("./only-dir")
    with pytest.raises(NotFoundError):
        resolve_ref_or_dir(st, "./missing")
    with pytest.raises(NotFoundError):
        resolve_ref_or_dir(st, "missing")
    (tmp_path / "demo").rename(tmp_path / "moved")
    assert resolve_ref_or_dir(st, "demo").name == "demo"  # no directory: the ref


@pytest.mark.parametrize("command", ["unload", "gate"])
def test_ambiguous_word_refused_by_commands(store, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    write_synthetic_adapter(tmp_path / "demo")
    base = write_synthetic_base(tmp_path / "base")
    policy = tmp_path / "gate.yaml"
    policy.write_text("version: 1\nseed: 0\nchecks:\n- kind: structural\n  max_rank: 16\n")
    extra = (["--out", str(tmp_path / "out")] if command == "unload"
             else ["--policy", str(policy), "--no-record"])
    code, out, err = run(capsys, command, "demo", "--base", base, "--store", store, *extra)
    assert code == 2, err
    lines = err.splitlines()
    assert lines[0].startswith("error: 'demo' is both a stored version (demo@sha256:")
    assert "./demo" in lines[0] and lines[1].startswith("fix: write ./demo for the directory")
    assert not (tmp_path / "out").exists()
    code, data = run_json(capsys, command, "demo", "--base", base, "--store", store, *extra)
    assert code == 2 and "both a stored version" in data["message"]


def test_unload_bare_directory_name_needs_a_path(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_adapter(tmp_path / "loose")
    base = write_synthetic_base(tmp_path / "base")
    code, _, err = run(capsys, "unload", "loose", "--base", base, "--out", tmp_path / "out",
                       "--store", store)
    assert code == 2 and "fix: write ./loose to use the directory" in err
    assert not (tmp_path / "out").exists()


# ---- alias rm ----------------------------------------------------------------------


def test_alias_rm_missing_alias_exits_5(store, capsys):
    from registry.storage.store import Store

    before = len(Store.open(store).audit().entries())
    code, _, err = run(capsys, "alias", "rm", "demo:nope", "--store", store)
    assert code == 5
    assert err.splitlines() == ["error: no alias demo:nope",
                                "fix: list the aliases with `adapters alias ls demo`"]
    code, data = run_json(capsys, "alias", "rm", "demo:nope", "--store", store)
    assert code == 5 and data["error"] == "NotFoundError"
    assert len(Store.open(store).audit().entries()) == before  # nothing audited
    assert run(capsys, "alias", "set", "demo:dev", "demo", "--store", store)[0] == 0
    code, data = run_json(capsys, "alias", "rm", "demo:dev", "--store", store)
    assert code == 0 and data["old"] and data["new"] is None


# ---- stale export temp dirs ----------------------------------------------------------


def _temp_dir(parent: Path, name: str, age_s: float) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - age_s
    for p in (path / "adapter_model.safetensors", path):
        os.utime(p, (old, old))
    return path


def test_export_removes_stale_temp_dirs_of_killed_exports(store, tmp_path, capsys):
    parent = tmp_path / "exports"
    stale = _temp_dir(parent, ".out.export-abc123_x", STALE_EXPORT_GRACE_S + 60)
    other_stale = _temp_dir(parent, ".earlier.export-zz9", 2 * STALE_EXPORT_GRACE_S)
    young = _temp_dir(parent, ".out.export-young1", 60)  # maybe a live export: kept
    lookalike = _temp_dir(parent, "out.export-abc", 10 * STALE_EXPORT_GRACE_S)  # not hidden
    target = _temp_dir(tmp_path, "elsewhere", 10 * STALE_EXPORT_GRACE_S)
    (parent / ".link.export-abc").symlink_to(target)  # never followed nor removed
    code, data = run_json(capsys, "export", "demo", parent / "out", "--store", store)
    assert code == 0 and (parent / "out" / "adapter_config.json").is_file()
    assert not stale.exists() and not other_stale.exists()
    assert young.is_dir() and lookalike.is_dir()
    assert (parent / ".link.export-abc").is_symlink() and (target / "adapter_model.safetensors").exists()


def test_remove_stale_exports_grace_is_a_parameter(tmp_path):
    stale = _temp_dir(tmp_path, ".x.export-aaa", 30)
    assert remove_stale_exports(tmp_path, grace_s=60) == []
    assert remove_stale_exports(tmp_path, grace_s=10) == [stale] and not stale.exists()
