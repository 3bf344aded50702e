"""Store permissions do not depend on the umask: nothing world- or group-writable, blobs 0444.

Everything runs under ``umask 000`` (restored afterwards), the worst case: plain
``open``/``mkdir`` would then create 0666 files and 0777 directories. The commands
cover every kind of store write -- init, push (blobs, manifest, binding, content
claim, audit), alias, gate record, sign, export, materialize, gc -- and afterwards
every file and directory of the store is checked, plus the exported directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import cli.main
from cli import sign_cmds
from registry.storage.store import Store
from tests.support.cli import run_json
from tests.support.registry import make_adapter_dir

if "cli.sign_cmds" not in cli.main.COMMAND_MODULES:  # until cli/main.py lists the module
    sign_cmds.register(cli.main.app)

GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


@pytest.fixture()
def umask_000() -> object:
    old = os.umask(0)
    try:
        yield None
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[Path, int]:
    out = {root: stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        out[path] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_no_writable_store_files_under_umask_000(tmp_path: Path, umask_000: object,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "deep" / "store"  # parents are created by init too
    assert run_json(capsys, "init", "--store", store)[0] == 0
    digests = []
    for seed in (1, 2):
        code, data = run_json(capsys, "push", make_adapter_dir(tmp_path / f"a{seed}", seed=seed),
                              "--name", "org/demo", "--alias", "candidate", "--store", store)
        assert code == 0, data
        digests.append(data["version"]["digest"])
    assert run_json(capsys, "alias", "set", "org/demo:stable", digests[0], "--store", store)[0] == 0
    st = Store.open(store)
    st.put_gate_record(digests[1], "sha256:" + "ab" * 32, {"passed": True})
    keys = tmp_path / "keys"
    assert run_json(capsys, "keygen", keys / "k.pem", keys / "k.pub")[0] == 0
    assert run_json(capsys, "sign", "org/demo", "--key", keys / "k.pem", "--store", store)[0] == 0
    code, data = run_json(capsys, "export", "org/demo", tmp_path / "export", "--store", store)
    assert code == 0, data
    st.materialize("org/demo", store / "tmp" / "work")  # merge-style scratch inside the store
    assert run_json(capsys, "gc", "--grace", "1h", "--store", store)[0] == 0
    st.put_bytes(b"orphan")
    assert run_json(capsys, "verify", "--all", "--store", store)[0] == 0

    modes = _modes(store)
    for sub in ("blobs/sha256", "names/org/demo/versions", "names/org/demo/aliases", "gates",
                "signatures", "audit", "locks", "tmp/work"):
        assert (store / sub).is_dir(), sub
    writable = {str(p.relative_to(tmp_path)): oct(m) for p, m in modes.items()
                if m & GROUP_OTHER_WRITE}
    assert writable == {}
    for path, mode in modes.items():
        if path.is_dir():
            assert mode == 0o755, (path, oct(mode))
        elif path.parent == store / "blobs" / "sha256":
            assert mode == 0o444, (path, oct(mode))
        elif path.parent != store / "tmp":  # temp files are 0600 until they are committed
            assert mode == 0o644, (path, oct(mode))
    export = _modes(tmp_path / "export")
    assert {p.name: oct(m) for p, m in export.items()} == {
        "export": "0o755", "adapter_config.json": "0o644", "adapter_model.safetensors": "0o644",
        "README.md": "0o644"}
    assert stat.S_IMODE((keys / "k.pem").stat().st_mode) == 0o600
    assert not stat.S_IMODE((keys / "k.pub").stat().st_mode) & GROUP_OTHER_WRITE
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o755
