"""Advisory ``fcntl.flock`` locks on files under ``<store>/locks/``.

A lock is held by an open file description, so the kernel releases it when the
holder dies (even on SIGKILL): a killed push never leaves the store locked.

Locks used by the store, always taken in this order to rule out deadlock:

``gc.lock``     shared by writers that add blobs (push, gate records), exclusive for gc,
                so gc never deletes a blob a concurrent push is about to bind;
``refs.lock``   exclusive around every change to ``names/`` and ``gates/``
                (bindings, alias compare-and-swap);
``audit.lock``  exclusive around each audit-log append.

flock locks conflict between two opens of the same file even inside one process,
so code must not take a lock it already holds (they are not re-entrant).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.errors import ConflictError
from registry.fsutil import make_dirs


@contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: The lock file.
        shared: Take a shared (read) lock instead of an exclusive one.
        timeout: Seconds to wait; None waits forever.

    Raises:
        ConflictError: The lock was not obtained within ``timeout``.
    """
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, shared, timeout)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, shared: bool, timeout: float | None) -> None:
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ConflictError(f"timed out after {timeout:g}s waiting for lock {path.name}",
                                    fix="another adapters process holds the store; retry when "
                                        "it finishes") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
