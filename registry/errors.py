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
====  =========================================================
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTEGRITY = 3
EXIT_CONFLICT = 4
EXIT_NOT_FOUND = 5


class AdapterkitError(Exception):
    """Base class of every error adapterkit raises on purpose.

    Args:
        message: One line saying what went wrong.
        fix: One line saying what the user can do about it, if anything.
    """

    exit_code: ClassVar[int] = EXIT_BAD_INPUT

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

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


class UnsupportedAdapterError(BadInputError):
    """The adapter uses a feature adapterkit refuses to handle (DoRA, lora_bias, ...)."""


class BaseMismatchError(BadInputError):
    """An adapter does not fit the base model it is combined with."""


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
