"""The error helpers: errno -> exit 6 with a fix, the internal-error form, bounded messages,
and the control-character escaping the CLI's output sink applies."""

from __future__ import annotations

import errno
import io

import pytest

from cli.output import SafeConsole, escape, escape_control, make_table
from registry.errors import (EXIT_ENVIRONMENT, EXIT_INTERNAL, MAX_MESSAGE, AdapterkitError,
                             EnvironmentFailure, InternalError, environment_error,
                             internal_error, shorten)


@pytest.mark.parametrize("code, reason, fix_word", [
    (errno.EACCES, "permission denied", "owner and mode"),
    (errno.EPERM, "operation not permitted", "owner and mode"),
    (errno.EROFS, "read-only file system", "writable"),
    (errno.ENOSPC, "no space left on device", "free space"),
    (errno.EDQUOT, "disk quota exceeded", "quota"),
    (errno.EFBIG, "file too large", "ulimit -f"),
    (errno.EIO, "input/output error", "verify --all"),
    (errno.ENOTDIR, "not a directory", "directories"),
    (errno.ELOOP, "symbolic link", "real path"),
    (errno.ECONNREFUSED, "network error", "network"),
    (errno.EXDEV, "os text", "check"),  # no special text: the system's own
])
def test_environment_error_per_errno(code, reason, fix_word):
    err = environment_error(OSError(code, "os text", "/store/blobs/x"), action="pushing")
    assert isinstance(err, EnvironmentFailure) and err.exit_code == EXIT_ENVIRONMENT == 6
    assert err.message.startswith("pushing: ") and reason in err.message
    assert "/store/blobs/x" in err.message and fix_word in err.fix


def test_environment_error_without_a_path():
    err = environment_error(OSError(errno.ENOSPC, "No space left on device"))
    assert err.message == "no space left on device" and "the path" in err.fix


def test_internal_error_form():
    err = internal_error(KeyError("x" * 5000))
    assert isinstance(err, InternalError) and err.exit_code == EXIT_INTERNAL == 70
    assert err.message.startswith("internal error (KeyError: ") and len(err.message) < 300
    assert err.fix == "this is a bug in adapterkit; please report it with the command you ran"
    assert err.to_json()["error"] == "InternalError"


def test_messages_and_values_are_bounded():
    assert len(AdapterkitError("m" * 10**6, fix="f" * 10**6).message) == MAX_MESSAGE
    assert shorten("s" * 10**6).endswith("...") and len(shorten("s" * 10**6)) == 200
    nested: list = []
    for _ in range(50):
        nested = [nested] * 10
    assert len(shorten(nested)) <= 200  # a bomb-like structure: bounded work and text
    assert shorten({"k": 1}) == "{'k': 1}"


def test_escape_control():
    text = "a\x1b[31mb\nfix: c\rd\te\x00\x7f\x85\u2028\u202e"
    assert escape_control(text) == ("a\\x1b[31mb\\nfix: c\\rd\\te\\x00\\x7f\\x85"
                                    "\\u2028\\u202e")
    assert escape_control("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
    assert escape_control(escape_control(text)) == escape_control(text)  # idempotent
    assert escape("[bold]x\n") == "\\[bold]x\\n"


def test_console_and_tables_never_write_control_characters():
    buffer = io.StringIO()
    console = SafeConsole(file=buffer, highlight=False, soft_wrap=True, width=120)
    console.print("template line\nsecond \x1b[2J line")
    console.print(make_table("t\x1b", ["c"], [["cell\nfix: forged"]]))
    from rich.tree import Tree

    tree = Tree("root\x1b]0;title\x07")
    tree.add("child")
    console.print(tree)
    out = buffer.getvalue()
    assert "\x1b" not in out and "\x07" not in out
    assert "template line\nsecond \\x1b[2J line" in out  # the template's own newline stays
    assert "cell\\nfix: forged" in out and "root\\x1b]0;title" in out  # rich drops BEL


def test_progress_description_is_escaped():
    from cli.output import Output

    buffer = io.StringIO()
    out = Output(False)
    out.err_console = SafeConsole(file=buffer, force_terminal=True, width=80)
    with out.progress("hashing x\x1b]0;evil[bold]", 4) as advance:
        advance(4)
    assert "x\\x1b]0;evil[bold]" in buffer.getvalue() and "\x1b]0;" not in buffer.getvalue()
