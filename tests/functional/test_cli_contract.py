"""The CLI-wide contract of DESIGN.md, checked over every registered command.

The commands are not listed by hand: the tests walk the click tree that
``typer.main.get_command(cli.main.app)`` builds, recursing into groups (``alias``,
``audit``), so a command added later is covered without touching this file.

* every leaf command takes ``--json`` (and ``--store``, except ``keygen``, which
  writes key files and never opens a store);
* ``adapters --help`` (a fresh interpreter, as the script runs) and ``adapters
  <cmd> [<sub>] --help`` for every command and group exit 0 and print a usage line;
* importing ``cli.main`` -- which registers every command module -- imports none of
  the heavy or optional dependencies; commands import them when they run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

import cli.main
from tests.support.cli import run
from tests.support.registry import REPO_ROOT, child_env

NOT_AT_IMPORT = ("torch", "transformers", "peft", "bitsandbytes", "huggingface_hub", "boto3",
                 "cryptography")
NO_STORE = {("keygen",)}  # writes a key pair; never opens a store


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield ``(path, command)`` for ``command`` and, recursively, every sub-command."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, path + (name,))


def is_group(command: Any) -> bool:
    return hasattr(command, "commands")


ROOT_COMMAND = typer.main.get_command(cli.main.app)
ALL = [(path, command) for path, command in walk(ROOT_COMMAND) if path]
LEAVES = [(path, command) for path, command in ALL if not is_group(command)]


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", ())}


def test_the_walk_sees_every_command_module() -> None:
    names = {path[0] for path, _ in ALL}
    # one command of each module of cli.main.COMMAND_MODULES, plus both groups' leaves
    assert {"init", "push", "pull", "sign", "merge", "unload", "quantize", "gate", "promote",
            "alias", "audit", "verify", "gc"} <= names, sorted(names)
    leaves = {" ".join(path) for path, _ in LEAVES}
    assert {"alias set", "alias rm", "audit verify"} <= leaves, sorted(leaves)


@pytest.mark.parametrize("path,command", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_takes_json_and_store(path: tuple[str, ...], command: Any) -> None:
    options = _options(command)
    assert "--json" in options, f"adapters {' '.join(path)} has no --json"
    json_param = next(p for p in command.params if "--json" in getattr(p, "opts", ()))
    assert json_param.is_flag and json_param.default is False
    if path not in NO_STORE:
        assert "--store" in options, f"adapters {' '.join(path)} has no --store"


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) for p, _ in ALL])
def test_every_command_help_exits_0(path: tuple[str, ...],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *path, "--help")
    assert code == 0, err
    assert "Usage:" in out and f"adapters {' '.join(path)}" in out, out


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) for p, _ in ALL])
def test_install_hints_in_help_keep_their_extras(path: tuple[str, ...],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # found by a QA pass: rich markup ate "[ui]" in "pip install 'adapterkit[ui]'"
    code, out, _ = run(capsys, *path, "--help")
    flat = " ".join(out.split())
    assert code == 0 and "'adapterkit'" not in flat and "adapterkit)" not in flat
    if path == ("ui",):
        assert "pip install 'adapterkit[ui]'" in flat


def test_top_level_help_exits_0_in_a_fresh_interpreter() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "--help"], cwd=REPO_ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path, _ in ALL:
        if len(path) == 1:
            assert path[0] in proc.stdout, path


def test_importing_the_cli_imports_nothing_heavy() -> None:
    probe = ("import sys, json\nimport cli.main\n"
             f"print(json.dumps([m for m in {NOT_AT_IMPORT!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_negative_limits_and_missing_checkpoints_are_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # found by a QA pass: `audit log --limit -5` listed everything; `ui --checkpoint missing`
    # started the server and failed only on the audit page
    store = tmp_path / "store"
    assert run(capsys, "init", store)[0] == 0
    code, _, err = run(capsys, "audit", "log", "--limit", "-5", "--store", store)
    assert code == 2 and "--limit" in err
    code, _, err = run(capsys, "ui", "--checkpoint", tmp_path / "missing.json", "--store", store)
    assert code == 5 and "checkpoint file" in err and "not found" in err  # not found, as a missing key file
