"""Named crash points for testing the store's write protocol (after etcd's gofail).

A failpoint is a call :func:`failpoint` placed between two durable steps of a write.
When the environment variable ``ADAPTERS_FAILPOINT`` names that point, the process
sends itself ``SIGKILL`` right there: no ``finally`` block, no ``atexit`` handler and
no buffered write gets to run, exactly as if the machine had lost power after the
steps already made durable. Tests run a real command once per point and then check
that the store verifies, the audit log is linear and the next command works
(``tests/functional/test_failpoints.py``).

Every point is declared in :data:`POINTS` (and listed in DESIGN.md); calling an
undeclared name is a programming error. With the variable unset, a failpoint costs
one dictionary lookup in ``os.environ``.

The write steps a mutation goes through (:mod:`registry.audit.journal`) give each operation
the same four points, ``<op>.before_intent``, ``<op>.after_marker``,
``<op>.after_entry`` and ``<op>.after_apply``, for ``op`` in :data:`OPERATIONS`.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "ADAPTERS_FAILPOINT"

OPERATIONS: tuple[str, ...] = ("push", "alias", "promote", "delete", "gate", "sign", "gc")
"""Operations that go through the intent protocol (the audit action they write)."""

STEPS: dict[str, str] = {
    "before_intent": "the change is decided (blobs stored), nothing about it recorded yet",
    "after_marker": "the intent marker audit/pending/<id> is durable, no audit entry yet",
    "after_entry": "the audit entry is durable, the binding/alias/pointer not yet written",
    "after_apply": "the change is applied, its intent marker not yet cleared",
}

POINTS: dict[str, str] = {
    **{f"{op}.{step}": text for op in OPERATIONS for step, text in STEPS.items()},
    "push.after_blobs": "the version's files are stored as blobs, no manifest yet",
    "audit.torn_line": "half of an audit line is written (a torn append; local log only)",
    "audit.before_head": "an audit entry is durable, audit/head.json not yet moved",
    "recover.after_entry": "recovery appended its rollback entry, marker not yet removed",
    "out.before_publish": "merge/unload/quantize: the version is recorded, its --out is "
                          "complete in a staging directory, not yet renamed into place",
}
"""Every failpoint name and what is durable when it fires."""


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if ``$ADAPTERS_FAILPOINT`` names ``name``.

    Raises:
        ValueError: ``name`` is not a declared failpoint (a bug in the caller).
    """
    if name not in POINTS:
        raise ValueError(f"undeclared failpoint {name!r}")
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether ``$ADAPTERS_FAILPOINT`` names ``name`` (for points that must act first,
    such as writing half a line before dying)."""
    return os.environ.get(ENV_VAR) == name


__all__ = ["ENV_VAR", "OPERATIONS", "POINTS", "STEPS", "armed", "failpoint"]
