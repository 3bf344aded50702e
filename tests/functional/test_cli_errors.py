"""The CLI's error boundary: one ``error:`` + ``fix:`` pair (or one JSON object), the
documented exit code, never a traceback, nothing half-written.

* the environment refuses (read-only file system, disk full, a store path that is a
  file, an export target that is a symlink) -> exit 6, on real tmpfs mounts
  (skipped without root);
* an uncaught exception -> ``error: internal error (...)``, exit 70;
* click/typer usage errors -> exit 2 with ``fix: run `adapters CMD --help```;
* control characters in labels, base model ids, paths and messages are escaped in
  human output and messages (no forged ``fix:`` line, no ESC), exact in JSON;
* messages quoting untrusted input are bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import run, run_json, write_synthetic_adapter
from tests.plugins.mounts import remount_read_only

ROOT = Path(__file__).resolve().parents[2]


def _two_lines(err: str) -> tuple[str, str]:
    """stderr must be exactly an ``error:`` line and a ``fix:`` line."""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("fix: "), err
    assert "Traceback" not in err
    return lines[0], lines[1]


def _init(capsys: pytest.CaptureFixture[str], root: Path) -> Path:
    code, _, err = run(capsys, "init", "--store", root)
    assert code == 0, err
    return root


# ---- the environment: exit 6 -------------------------------------------------------


def test_push_to_read_only_store_exits_6_and_json(tmpfs, tmp_path, capsys):
    mnt = tmpfs("ro", "5m")
    store = _init(capsys, mnt / "store")
    adapter = write_synthetic_adapter(tmp_path / "ad")
    remount_read_only(mnt)
    code, out, err = run(capsys, "push", adapter, "--name", "demo", "--store", store)
    assert code == 6
    error, fix = _two_lines(err)
    assert "read-only file system" in error and str(store) in error
    assert "writable" in fix
    code, data = run_json(capsys, "push", adapter, "--name", "demo", "--store", store)
    assert code == 6 and data["exit_code"] == 6 and data["error"] == "EnvironmentFailure"
    assert "read-only file system" in data["message"] and data["fix"]
    code, listing = run_json(capsys, "ls", "--store", store)  # reading still works
    assert code == 0 and listing == {"names": []}


def test_gc_dry_run_reads_a_read_only_store_and_a_real_gc_exits_6(tmpfs, tmp_path, capsys):
    """Found by a CLI contract pass: `gc --dry-run` only reads, yet it opened its lock files
    and failed with exit 6 on a read-only mount. Now it plans there; `gc` itself still
    refuses with the environment's exit code, and nothing changes."""
    mnt = tmpfs("ro-gc", "5m")
    store = _init(capsys, mnt / "store")
    from registry.storage.store import Store

    code, _, err = run(capsys, "push", write_synthetic_adapter(tmp_path / "a"), "--name", "demo",
                       "--store", store)
    assert code == 0, err
    orphan, _ = Store.open(store).blobs.put_bytes(b"nothing refers to this blob")
    code, writable = run_json(capsys, "gc", "--dry-run", "--grace", "0s", "--store", store)
    assert code == 0 and writable["removed"] == [orphan], writable
    remount_read_only(mnt)
    code, data = run_json(capsys, "gc", "--dry-run", "--grace", "0s", "--store", store)
    assert code == 0, data
    assert data["removed"] == writable["removed"] and data["dry_run"] is True
    code, _, err = run(capsys, "gc", "--grace", "0s", "--store", store)
    assert code == 6
    assert "read-only file system" in _two_lines(err)[0]


def test_an_output_on_a_read_only_mount_names_the_output_not_its_temp_dir(tmpfs, tmp_path, capsys):
    """Found by a CLI contract pass: the message named the hidden temp directory beside the
    output (`.OUT.x1y2z3.tmp`) and told the user to fix the store."""
    store = _init(capsys, tmp_path / "store")
    code, _, err = run(capsys, "push", write_synthetic_adapter(tmp_path / "a"), "--name", "demo",
                       "--store", store)
    assert code == 0, err
    mnt = tmpfs("ro-out", "1m")
    remount_read_only(mnt)
    for argv in (["merge", "demo", "demo", "--out", mnt / "merged"],
                 ["export", "demo", mnt / "exported"], ["export", "demo", mnt / "sub" / "deeper"]):
        out_dir = Path(argv[-1])
        code, _, err = run(capsys, *argv, "--store", store)
        assert code == 6, err
        error, fix = _two_lines(err)
        assert error.startswith(f"error: writing {out_dir}: read-only file system"), error
        assert ".tmp" not in err and ".export-" not in err and "--store" not in fix, err
        assert "writable" in fix
        assert not out_dir.exists()


def test_push_on_full_disk_exits_6_leaves_nothing(tmpfs, tmp_path, capsys):
    mnt = tmpfs("full", "5m")
    store = _init(capsys, mnt / "store")
    big = write_synthetic_adapter(tmp_path / "big", hidden=2048, layers=4, r=64)  # ~8 MB
    code, _, err = run(capsys, "push", big, "--name", "big", "--store", store)
    assert code == 6
    error, fix = _two_lines(err)
    assert "no space left on device" in error and "gc" in fix
    assert list((store / "tmp").iterdir()) == []  # the failing push cleaned its temp files
    code, data = run_json(capsys, "ls", "--store", store)
    assert code == 0 and data == {"names": []}  # no half-written version is visible
    code, report = run_json(capsys, "verify", "--all", "--store", store)
    assert code == 0, report
    small = write_synthetic_adapter(tmp_path / "small")  # the next command works
    code, data = run_json(capsys, "push", small, "--name", "small", "--store", store)
    assert code == 0 and data["created"]


@pytest.mark.parametrize("args", [["ls"], ["init"], ["push", "ADAPTER", "--name", "x"]])
def test_store_path_that_is_a_file_exits_6(tmp_path, capsys, args):
    blocker = tmp_path / "file"
    blocker.write_text("not a store")
    adapter = write_synthetic_adapter(tmp_path / "ad")
    argv = [adapter if a == "ADAPTER" else a for a in args]
    for store in (blocker, blocker / "sub"):
        code, _, err = run(capsys, *argv, "--store", store)
        assert code == 6, err
        error, fix = _two_lines(err)
        assert "not a directory" in error and str(blocker) in error
        assert "--store" in fix
    code, data = run_json(capsys, *argv, "--store", blocker)
    assert code == 6 and data["error"] == "EnvironmentFailure"
    assert blocker.read_text() == "not a store"


@pytest.mark.parametrize("target_exists", [True, False])
def test_export_into_symlink_refused_not_followed(tmp_path, capsys, target_exists):
    store = _init(capsys, tmp_path / "store")
    adapter = write_synthetic_adapter(tmp_path / "ad")
    assert run(capsys, "push", adapter, "--name", "demo", "--store", store)[0] == 0
    real = tmp_path / "real"
    if target_exists:
        real.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real)
    code, _, err = run(capsys, "export", "demo", link, "--store", store)
    assert code == 6
    error, _ = _two_lines(err)
    assert "symbolic link" in error
    assert link.is_symlink() and (list(real.iterdir()) == [] if target_exists
                                  else not real.exists())
    assert [p.name for p in tmp_path.iterdir() if ".export-" in p.name] == []
    code, data = run_json(capsys, "export", "demo", link, "--store", store)
    assert code == 6 and "symbolic link" in data["message"]


def test_export_on_full_disk_exits_6_leaves_nothing(tmpfs, tmp_path, capsys):
    store = _init(capsys, tmp_path / "store")
    big = write_synthetic_adapter(tmp_path / "big", hidden=2048, layers=4, r=64)
    assert run(capsys, "push", big, "--name", "big", "--store", store)[0] == 0
    mnt = tmpfs("small", "1m")
    code, _, err = run(capsys, "export", "big", mnt / "out", "--store", store)
    assert code == 6
    error, _ = _two_lines(err)
    assert "no space left on device" in error and str(mnt / "out") in error
    assert list(mnt.iterdir()) == []  # neither out nor a hidden temp dir


def test_unreachable_s3_endpoint_exits_6(tmp_path, capsys, monkeypatch):
    pytest.importorskip("boto3")
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for var, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
                       "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                       "AWS_DEFAULT_REGION": "us-east-1", "ADAPTERS_CACHE": str(tmp_path)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    code, _, err = run(capsys, "ls", "--store", "s3://no-bucket/x")
    assert code == 6
    error, fix = _two_lines(err)
    assert "cannot reach S3" in error and "network" in fix


def test_a_hung_s3_endpoint_gives_up_within_its_timeouts(tmp_path, capsys, monkeypatch):
    # found by a QA pass: an endpoint that accepts connections and never answers held a
    # command for six minutes (boto3's 60 s read timeout x 5 attempts) before exit 6
    pytest.importorskip("boto3")
    import json
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts (the kernel's backlog), never answers
    config = tmp_path / "s3.json"
    config.write_text(json.dumps({"read_timeout": 1, "connect_timeout": 1, "max_attempts": 2}))
    for var, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{listener.getsockname()[1]}",
                       "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                       "AWS_DEFAULT_REGION": "us-east-1", "ADAPTERS_CACHE": str(tmp_path),
                       "ADAPTERS_S3_CONFIG": str(config)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    start = time.monotonic()
    try:
        code, _, err = run(capsys, "ls", "--store", "s3://hung-bucket/x")
    finally:
        listener.close()
    assert code == 6 and time.monotonic() - start < 30
    assert _two_lines(err)[0].startswith("error: ")


def test_real_entry_point_prints_no_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "ls", "--store", str(blocker)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6, proc.stderr
    _two_lines(proc.stderr)


# ---- last resort: exit 70 ----------------------------------------------------------


def _break_ls(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.storage.store import Store

    def boom(self: object) -> list[str]:
        raise ZeroDivisionError("division by zero\nfix: run rm -rf /")

    monkeypatch.setattr(Store, "names", boom)


def test_uncaught_exception_is_internal_error_70(tmp_path, capsys, monkeypatch):
    store = _init(capsys, tmp_path / "store")
    _break_ls(monkeypatch)
    monkeypatch.delenv("ADAPTERS_DEBUG", raising=False)
    code, _, err = run(capsys, "ls", "--store", store)
    assert code == 70
    error, fix = _two_lines(err)
    assert error.startswith("error: internal error (ZeroDivisionError: division by zero")
    assert fix == "fix: this is a bug in adapterkit; please report it with the command you ran"
    code, data = run_json(capsys, "ls", "--store", store)
    assert code == 70 and data["exit_code"] == 70 and data["error"] == "InternalError"
    assert data["message"].startswith("internal error (ZeroDivisionError:")


@pytest.mark.parametrize("raised", [
    MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                                "allocate memory: you tried to allocate 4194304 bytes"),
    RuntimeError("can't start new thread"), RuntimeError("CUDA out of memory. Tried to allocate"),
])
def test_running_out_of_memory_is_exit_6_not_a_bug(tmp_path, capsys, monkeypatch, raised):
    # found by a resource-exhaustion pass: unload/quantize under `ulimit -v` exited 70
    from registry.storage.store import Store

    store = _init(capsys, tmp_path / "store")

    def oom(self: object) -> list[str]:
        raise raised

    monkeypatch.setattr(Store, "names", oom)
    monkeypatch.delenv("ADAPTERS_DEBUG", raising=False)
    code, _, err = run(capsys, "ls", "--store", store)
    error, fix = _two_lines(err)
    assert code == 6 and error.startswith("error: out of memory")
    assert fix.startswith("fix: free memory or raise the memory limit")
    code, data = run_json(capsys, "ls", "--store", store)
    assert code == 6 and data["exit_code"] == 6 and data["error"] == "EnvironmentFailure"


def test_a_runtime_error_that_is_not_about_memory_is_still_a_bug(tmp_path, capsys, monkeypatch):
    from registry.storage.store import Store

    store = _init(capsys, tmp_path / "store")

    def broken(self: object) -> list[str]:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Store, "names", broken)
    monkeypatch.delenv("ADAPTERS_DEBUG", raising=False)
    assert run(capsys, "ls", "--store", store)[0] == 70


def test_ctrl_c_is_exit_130_with_the_error_and_fix_lines(tmp_path, capsys, monkeypatch):
    # found by a resource-exhaustion pass: typer turns KeyboardInterrupt into Exit(130), so
    # Ctrl-C during `unload --json` exited 130 printing nothing at all
    from registry.storage.store import Store

    store = _init(capsys, tmp_path / "store")

    def interrupted(self: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "names", interrupted)
    code, _, err = run(capsys, "ls", "--store", store)
    error, fix = _two_lines(err)
    assert code == 130 and error == "error: interrupted; nothing half-written is visible"
    assert fix.startswith("fix: run the command again")
    code, data = run_json(capsys, "ls", "--store", store)
    assert code == 130 and data["exit_code"] == 130 and data["error"] == "InterruptedByUser"


@pytest.mark.parametrize("kind", ["library", "storage"])
def test_ctrl_c_that_a_library_turns_into_another_error_is_still_exit_130(tmp_path, capsys, monkeypatch,
                                                                          kind):
    """Found by a QA pass: Ctrl-C inside Optuna's tell surfaced as its UnboundLocalError
    (exit 70, "internal error"), or, through SQLAlchemy, as a storage failure (exit 6)."""
    from registry.errors import EnvironmentFailure
    from registry.storage.store import Store

    store = _init(capsys, tmp_path / "store")

    def interrupted(self: object) -> list[str]:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            try:  # what the library's cleanup raised while handling it
                raise UnboundLocalError("cannot access local variable 'updated_state'")
            except UnboundLocalError as err:
                if kind == "library":
                    raise
                raise EnvironmentFailure("the study storage failed: An exception is raised during "
                                         "the commit", fix="free space") from err

    monkeypatch.setattr(Store, "names", interrupted)
    code, data = run_json(capsys, "ls", "--store", store)
    assert code == 130 and data["error"] == "InterruptedByUser", data


def test_adapters_debug_reraises(tmp_path, capsys, monkeypatch):
    store = _init(capsys, tmp_path / "store")
    _break_ls(monkeypatch)
    monkeypatch.setenv("ADAPTERS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run(capsys, "ls", "--store", store)


# ---- usage errors: exit 2 ----------------------------------------------------------


@pytest.mark.parametrize("argv, command, needle", [
    (["ls", "--bogus"], "adapters ls", "No such option: --bogus"),
    (["merge"], "adapters merge", "Missing argument"),
    (["alias", "set"], "adapters alias set", "Missing argument"),
    (["merge", "a", "b", "--seed", "abc"], "adapters merge", "Invalid value for '--seed'"),
    (["no-such-command"], "adapters", "No such command"),
])
def test_usage_errors_are_error_fix_exit_2(capsys, argv, command, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    error, fix = _two_lines(err)
    assert needle in error
    assert fix == f"fix: run `{command} --help`"
    code, data = run_json(capsys, *argv)
    assert code == 2 and data["exit_code"] == 2 and data["error"] == "UsageError"
    assert needle in data["message"] and data["fix"] == f"run `{command} --help`"


@pytest.mark.parametrize("argv", [[], ["alias"], ["audit"]])
def test_a_group_without_its_command_shows_help_then_the_error_line(capsys, argv):
    # found by a QA pass: the help alone, exit 2 and nothing on stderr
    code, out, err = run(capsys, *argv)
    group = " ".join(["adapters", *argv])
    assert code == 2 and "Usage:" in out
    assert _two_lines(err) == (f"error: missing command after `{group}`", f"fix: run `{group} --help`")


# ---- control characters and bounded messages ---------------------------------------

FORGED = "x\nfix: run rm -rf /"
ESC = "\x1b[31mred\x1b[0m\r"


def test_control_characters_escaped_in_human_output(tmp_path, capsys):
    store = _init(capsys, tmp_path / "store")
    adapter = write_synthetic_adapter(tmp_path / "ad")
    code, _, err = run(capsys, "push", adapter, "--name", "demo", "--store", store,
                       "--label", f"note={FORGED}", "--base-model", ESC)
    assert code == 0, err
    for argv in (["show", "demo"], ["diff", "demo", "demo"], ["ls"], ["lineage", "demo"]):
        code, out, err = run(capsys, *argv, "--store", store)
        assert code == 0, err
        for text in (out, err):
            assert "\x1b" not in text and "\r" not in text
            assert not any(line.lstrip("│┃ ").startswith("fix:") for line in text.splitlines())
    code, out, _ = run(capsys, "show", "demo", "--store", store)
    assert "x\\nfix: run rm -rf /" in out and "\\x1b[31mred\\x1b[0m\\r" in out
    code, data = run_json(capsys, "show", "demo", "--store", store)  # JSON stays exact
    assert data["record"]["labels"]["note"] == FORGED
    assert data["record"]["base_model"]["id"] == ESC


def test_control_characters_escaped_in_error_messages(tmp_path, capsys):
    hostile = tmp_path / f"no{FORGED}{ESC}"
    code, _, err = run(capsys, "ls", "--store", hostile)
    assert code == 5
    error, fix = _two_lines(err)
    assert "\\nfix: run rm -rf" in error and "\\x1b[31m" in error and "\x1b" not in err
    assert fix.startswith("fix: run `adapters init`")
    code, data = run_json(capsys, "ls", "--store", hostile)
    assert code == 5 and str(hostile) in data["message"]  # exact in JSON


def test_messages_quoting_input_are_bounded(tmp_path, capsys):
    store = _init(capsys, tmp_path / "store")
    adapter = write_synthetic_adapter(tmp_path / "ad")
    huge = "k" * 100_000
    code, _, err = run(capsys, "push", adapter, "--name", "demo", "--store", store,
                       "--hparam", huge)
    assert code == 2
    error, _ = _two_lines(err)
    assert len(error) < 400 and error.endswith("...")


def test_json_errors_parse_as_one_object(tmp_path, capsys):
    code, out, err = run(capsys, "ls", "--bogus", "--json")
    assert code == 2 and err == ""
    assert json.loads(out)["exit_code"] == 2


@pytest.mark.parametrize(("argv", "words"), [
    (["gate", "x", "--policy", ""], "empty value for '--policy'"),
    (["gate", "x", "--base="], "empty value for '--base'"),
    (["export", "x", ""], "an empty argument"),
    (["unload", "x", "--base", "b", "--out", ""], "empty value for '--out'"),
    (["alias", "set", "x:release", ""], "an empty argument"),
])
def test_an_empty_argument_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, argv, words):
    # found by a CLI contract pass: an empty path read as ".", so `--policy "$UNSET"` or an
    # empty OUT named the current directory
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    error, fix = _two_lines(err)
    assert code == 2 and words in error and "unset shell variable" in error
    assert list(tmp_path.iterdir()) == []
