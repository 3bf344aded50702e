"""One exception hierarchy for the whole of adapterkit.

Every error a user can cause carries a one-line message, an optional fix
(what to do about it) and a process exit code. The CLI maps any
:class:`AdapterkitError` to ``error: <message>`` / ``fix: <fix>`` and exits with
its code, so library code never prints or calls ``sys.exit`` itself.

Exit codes (documented in README.md):

====  =========================================================
0     success
1     gate failed (a check did not pass, promotion refused)
2     usage error or bad input (unreadable file, bad config, unsupported adapter)
3     integrity failure (hash mismatch, broken audit chain, missing blob)
4     conflict (alias moved under you, name already bound)
5     not found (unknown name, version, alias or path)
6     environment (permission denied, read-only file system, disk full, I/O or
      network error, a store path that is a file, an export target that is a symlink)
70    internal error (an uncaught exception: a bug in adapterkit)
====  =========================================================

Errors from the operating system (:class:`OSError`) become
:class:`EnvironmentFailure` through :func:`environment_error`, which names the path
that failed and says what to do for each ``errno``; library code that knows more
(which store, which export target) wraps them itself, and ``cli/main.py`` maps any
that reach it. Messages quote untrusted values through :func:`shorten`, and every
message is capped at :data:`MAX_MESSAGE` characters, so a hostile config or label
cannot blow up an error line.
"""

from __future__ import annotations

import errno
import re
import os
from typing import ClassVar

EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTEGRITY = 3
EXIT_CONFLICT = 4
EXIT_NOT_FOUND = 5
EXIT_ENVIRONMENT = 6
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

MAX_MESSAGE = 1000
"""Longest message or fix kept (longer ones end in ``...``)."""
MAX_VALUE = 200
"""Longest quoted value :func:`shorten` keeps."""


def clip(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def shorten(value: object, limit: int = MAX_VALUE) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters.

    ``reprlib``-style bounding happens before the full ``repr`` is built for big
    containers, so a hostile structure (a YAML bomb expanded to millions of items)
    costs no more than ``limit`` characters of work per level.
    """
    import reprlib

    if isinstance(value, str):  # cut before repr: O(limit), and the cut shows as "..."
        return clip(repr(value[: limit + 1]), limit)
    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlist = bounded.maxdict = bounded.maxtuple = bounded.maxset = 8
    bounded.maxlevel = 3
    return clip(bounded.repr(value), limit)


class AdapterkitError(Exception):
    """Base class of every error adapterkit raises on purpose.

    Args:
        message: One line saying what went wrong.
        fix: One line saying what the user can do about it, if anything.
    """

    exit_code: ClassVar[int] = EXIT_BAD_INPUT

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        message = clip(str(message), MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        self.fix = None if fix is None else clip(str(fix), MAX_MESSAGE)

    def to_json(self) -> dict[str, object]:
        """Machine-readable form used by ``--json`` output."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "fix": self.fix,
            "exit_code": self.exit_code,
        }


class BadInputError(AdapterkitError):
    """The input is malformed, unsupported or inconsistent (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class UsageError(BadInputError):
    """The command line itself is wrong: unknown option, missing argument (exit 2)."""


class UnsupportedAdapterError(BadInputError):
    """The adapter uses a feature adapterkit refuses to handle (DoRA, lora_bias, ...)."""


class BaseMismatchError(BadInputError):
    """An adapter does not fit the base model it is combined with."""


class MergeRangeError(BadInputError):
    """A merge's values leave the range of float32 or the output dtype (weights, lambda or
    factors too large): the recipe, not the adapters, is refused."""


class GateFailedError(AdapterkitError):
    """A gate check failed or a promotion lacks a passing gate record (exit 1)."""

    exit_code = EXIT_GATE_FAILED


class IntegrityError(AdapterkitError):
    """Stored bytes do not match their digest, or a hash chain is broken (exit 3)."""

    exit_code = EXIT_INTEGRITY


class ConflictError(AdapterkitError):
    """A compare-and-swap lost, or a name/version is already bound (exit 4)."""

    exit_code = EXIT_CONFLICT


class NotFoundError(AdapterkitError):
    """A name, version, alias, blob or path does not exist (exit 5)."""

    exit_code = EXIT_NOT_FOUND


class EnvironmentFailure(AdapterkitError):
    """The operating system or the network refused: permission, space, I/O (exit 6).

    Not the user's input and not a bug: the same command works once the environment
    is fixed (space freed, permissions or mount changed, network back).
    """

    exit_code = EXIT_ENVIRONMENT


class InterruptedByUser(AdapterkitError):
    """Ctrl-C (SIGINT): exit 130, the shell's code for it. Outputs are renamed into place
    at the end, so nothing half-written is visible; a store's leftovers are gc's."""

    exit_code = EXIT_INTERRUPTED


class InternalError(AdapterkitError):
    """An uncaught exception: a bug in adapterkit (exit 70, the CLI's last resort)."""

    exit_code = EXIT_INTERNAL


_REPORT_FIX = "this is a bug in adapterkit; please report it with the command you ran"

_ERRNO_TEXT: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "check the owner and mode of {path}, or use a store "
                                        "you may write (--store / $ADAPTERS_HOME)"),
    errno.EPERM: ("operation not permitted", "check the owner and mode of {path}, or use a "
                                             "store you may write (--store / $ADAPTERS_HOME)"),
    errno.EROFS: ("read-only file system", "remount {path} read-write, or use a store on a "
                                           "writable file system (--store)"),
    errno.ENOSPC: ("no space left on device", "free space on the disk holding {path} (e.g. "
                                              "`adapters gc`) or move the store, then retry"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota for {path} (e.g. "
                                          "`adapters gc`), then retry"),
    errno.EFBIG: ("file too large", "raise the file size limit (`ulimit -f`) or use a file "
                                    "system that holds large files"),
    errno.EIO: ("input/output error", "check the disk holding {path} (dmesg), then run "
                                      "`adapters verify --all`"),
    errno.ENOTDIR: ("not a directory (a component of the path is a file)",
                    "pass a path whose parents are directories"),
    errno.EISDIR: ("is a directory", "pass a file path, not a directory"),
    errno.EEXIST: ("already exists (a file is in the way)", "move the file out of the way "
                                                           "or pick another path"),
    errno.ELOOP: ("too many symbolic links, or a symbolic link where none is followed",
                  "pass the real path, not a symbolic link"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.ENOENT: ("no such file or directory", "check that {path} exists and was not "
                                                "removed while the command ran"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (`ulimit -n`)"),
    errno.ENOMEM: ("out of memory", "free memory or use a machine with more"),
}


def os_error_in(exc: BaseException) -> OSError | None:
    """The :class:`OSError` behind a library error that only names it in its text.

    safetensors' Rust writer raises ``SafetensorError("... I/O error: No space left on
    device (os error 28)")``: not an ``OSError``, so a full disk ended as an internal error
    (exit 70) or as bad input. Returns the ``OSError`` (errno and message) it names, or
    None when the text names none.
    """
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "can't start new thread",
                  "cannot allocate memory")


def out_of_memory_error(err: BaseException) -> EnvironmentFailure | None:
    """Running out of memory (or threads) as exit 6, else None.

    Python raises ``MemoryError``; torch's CPU allocator and CUDA raise ``RuntimeError``s
    that say so ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory"), and a
    thread pool under a tight ``ulimit -v`` fails with "can't start new thread". All of
    these ended as internal errors (exit 70, "this is a bug"). Nothing is half-written
    either way: outputs are renamed into place at the end.
    """
    text = str(err).lower()
    if not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and any(w in text for w in _OUT_OF_MEMORY))):
        return None
    detail = " ".join(str(err).split())[:160] or type(err).__name__
    return EnvironmentFailure(f"out of memory ({detail})",
                              fix="free memory or raise the memory limit (ulimit -v), or use a "
                                  "machine with more memory, then run the command again")


def environment_error(err: OSError, *, path: object = None,
                      action: str | None = None) -> EnvironmentFailure:
    """The :class:`EnvironmentFailure` for an :class:`OSError`, with a fix for its errno.

    Args:
        err: The error the operating system (or a network library) raised.
        path: The path or location that failed (default: the error's own filename).
        action: What was being done, e.g. ``"writing the store"`` (prefixes the message).

    Returns:
        The error to raise (``raise environment_error(err) from err``).
    """
    where = path if path is not None else err.filename
    shown = "the path" if where is None else clip(os.fsdecode(str(where)))
    known = _ERRNO_TEXT.get(err.errno or -1)
    if known is not None:
        reason, fix = known
    else:
        if isinstance(err, (ConnectionError, TimeoutError)) or err.errno in (
                errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                errno.ENETUNREACH):
            reason, fix = "network error", "check the network and the endpoint, then retry"
        else:
            reason = clip(err.strerror or str(err) or type(err).__name__)
            fix = "check {path} and the system it is on, then retry"
    message = f"{reason}: {shown}" if where is not None else reason
    if action:
        message = f"{action}: {message}"
    return EnvironmentFailure(message, fix=fix.format(path=shown))


def output_error(err: OSError, out_dir: object) -> EnvironmentFailure:
    """The error for an output directory that cannot be made where it was asked for.

    Outputs are written into a hidden temp directory beside ``out_dir`` and renamed onto it,
    so the operating system names that temp directory (``.OUT.x1y2z3.tmp``): the message
    names the output instead, and for a read-only or foreign parent the fix is about the
    output path, not the store.
    """
    out = os.path.abspath(os.fsdecode(os.fspath(str(out_dir))))
    parent = os.path.dirname(out)
    failure = environment_error(err, path=parent, action=f"writing {clip(out)}")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return EnvironmentFailure(failure.message, fix=f"choose an output directory on a writable "
                                                       f"file system, or make {clip(parent)} writable")
    return failure


def internal_error(err: BaseException) -> InternalError:
    """The CLI's last-resort error for an exception nothing else handled."""
    detail = clip(" ".join(str(err).split()) or "no message")
    return InternalError(f"internal error ({type(err).__name__}: {detail})", fix=_REPORT_FIX)
