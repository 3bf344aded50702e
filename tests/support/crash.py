"""Shared parts of the crash tests (``test_crash_push_cli.py``, ``test_crash_merge_cli.py``).

Both run a driver process that forks the real CLI (``cli.main.main``) per trial and
SIGKILLs it at a random moment. The driver side (:func:`fork_main`, :func:`wait`,
:func:`kill_after`, :func:`kill_trial`, :func:`open_verified`) runs inside that driver,
which imports this module; the test side
(:func:`run_driver`, :func:`check_store_after_kills`) starts the driver and checks the
store through the CLI once every trial is done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.registry import PYTHON, REPO_ROOT, child_env

if TYPE_CHECKING:  # the driver imports this module too; it needs neither
    import pytest


def fork_main(args: list[str]) -> int:
    """Fork a child that runs ``cli.main.main(args)`` with its output discarded; its pid."""
    from cli.main import main

    pid = os.fork()
    if pid == 0:  # the child: the real CLI, output discarded
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        code = 1
        try:
            code = main(args)
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """Reap ``pid``: its exit code, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_after(pid: int, delay: float) -> int:
    """SIGKILL ``pid`` after ``delay`` seconds (unless it ended), then :func:`wait` for it."""
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return wait(pid)


def kill_trial(args: list[str], delay: float, trial: int, outcomes: dict[str, int],
               failures: list[str]) -> int:
    """One trial: fork ``args``, SIGKILL it after ``delay``; its exit code (minus a signal).

    Counts ``outcomes["killed"]`` or ``outcomes["finished"]`` and adds a failure when
    the command exited non-zero without being killed.
    """
    code = kill_after(fork_main(args), delay)
    outcomes["killed" if code == -signal.SIGKILL else "finished"] += 1
    if code not in (0, -signal.SIGKILL):
        failures.append(f"trial {trial}: {args[0]} exited {code} without being killed")
    return code


def open_verified(root: str, trial: int, failures: list[str]) -> Any:
    """The store at ``root`` as a kill left it; a failure unless ``verify`` is clean."""
    from registry.maintenance.integrity import verify
    from registry.storage.store import Store

    store = Store.open(root)
    report = verify(store)
    if not report.ok:
        failures.append(f"trial {trial}: verify {report.to_json()['problems']}")
    return store


def run_driver(driver: str, args: list[Any], *, env: dict[str, str] | None = None) -> dict:
    """Run the driver script with ``args``; the JSON object on its last stdout line.

    Asserts that the driver exited 0 (its output tail is the message otherwise).
    """
    proc = subprocess.run([PYTHON, "-c", driver, *(str(a) for a in args)],
                          env=env if env is not None else child_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_store_after_kills(capsys: pytest.CaptureFixture[str], store: Path,
                            versions: int) -> None:
    """``verify --all``, ``audit verify``, ``gc --grace 0s``, ``verify --all`` via the CLI.

    Asserts each succeeds, ``versions`` versions are bound before and after gc, and gc
    leaves ``tmp/`` empty (the dead processes' temp files and work directories are gone).
    """
    from tests.support.cli import run_json

    code, data = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 0 and data["ok"] and data["versions"] == versions, data
    code, data = run_json(capsys, "audit", "verify", "--store", store)
    assert code == 0, data
    code, data = run_json(capsys, "gc", "--grace", "0s", "--store", store)
    assert code == 0, data
    assert not list((store / "tmp").iterdir())  # the dead processes' leftovers are gone
    code, data = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 0 and data["versions"] == versions, data
