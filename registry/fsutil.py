"""Durable, umask-independent local file writes shared by the store and the audit log.

Durable small-file writes (:func:`atomic_write_bytes`) go through a temp file in
the same directory, ``fsync``, ``os.replace`` and an ``fsync`` of the directory, so
a crash leaves either the old or the new content, never a torn file.

Permissions do not depend on the caller's umask: store files get an explicit mode
(0644, blobs 0444) and every directory the registry creates goes through
:func:`make_dirs`, which creates it with mode 0755 (the umask can only make that
stricter), so even ``umask 000`` never yields a world-writable store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import BinaryIO
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> Path:
    """``mkdir -p path``, leaving every directory it creates 0755 or stricter.

    ``Path.mkdir(parents=True)`` makes directories ``0777 & ~umask`` (world-writable
    under ``umask 000``); here each missing component is made with mode 0755, which
    the umask can only make stricter. Existing directories are left alone.

    Returns:
        ``path``.

    Raises:
        OSError: A component cannot be created (or exists as a file).
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            if not directory.is_dir():
                raise
            # a concurrent process made it (with the same mode)
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` durably: temp file in the same dir, fsync, rename.

    Readers see either the old file or the complete new one. The file gets ``mode``
    whatever the umask; missing directories are made by :func:`make_dirs`.

    Raises:
        OSError: The file cannot be written.
    """
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def unlink_quietly(path: str | Path) -> None:
    """Remove a (temp) file, ignoring every ``OSError`` (already gone, no permission)."""
    try:
        os.unlink(path)
    except OSError:
        pass


STALE_TEMP_GRACE_S = 3600.0
"""Default age (seconds since the last write) after which a killed writer's temp dir goes."""


def newest_mtime(path: Path) -> float | None:
    """The newest mtime in ``path``'s tree (symlinks not followed); None if ``path``
    vanished. Entries that vanish while it is walked (a writer finishing) are skipped."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return None
    for root, dirs, files in os.walk(path):  # os.walk ignores directories that vanish
        for entry in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def temp_dir_beside(out_dir: Path, prefix: str, suffix: str = "") -> Path:
    """``mkdtemp`` in ``out_dir``'s parent (made if missing): where an output is staged
    before it is renamed onto ``out_dir``.

    Raises:
        EnvironmentFailure: The parent cannot be made or written; the message names
            ``out_dir``, not the hidden temp name (:func:`registry.errors.output_error`).
    """
    from registry.errors import output_error

    try:
        make_dirs(out_dir.parent)
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=out_dir.parent))
    except OSError as err:
        raise output_error(err, out_dir) from err


def remove_stale_dirs(parent: Path, pattern: re.Pattern[str], *,
                      grace_s: float = STALE_TEMP_GRACE_S, now: float | None = None) -> list[Path]:
    """Remove the temp dirs a killed writer left in ``parent``: names matching ``pattern``,
    nothing written inside for ``grace_s`` (a live writer keeps writing).

    Only real directories whose name has the temp pattern are touched (symbolic links
    are never followed or removed); errors on one entry are skipped, so a cleanup
    problem never fails the command that asked for it.

    Args:
        parent: The directory the writer writes into.
        pattern: The temp dirs' names (anchored, with the random part's exact form).
        grace_s: Minimum age in seconds of the newest write inside a temp dir.
        now: The current time (default: ``time.time()``).

    Returns:
        The directories removed.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.match(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            newest = newest_mtime(path)
            if newest is None or now - newest < grace_s:
                continue
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def leased_temp_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A temp directory under ``parent`` (a store's ``tmp/``) that ``gc`` leaves alone while
    this process lives: an ``flock`` on the directory is held until the block ends, then
    the directory is removed. A killed process releases the lock with its death, so
    ``gc`` removes what it left once it is older than the grace period
    (:func:`is_leased`).
    """
    make_dirs(parent)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def is_leased(path: Path) -> bool:
    """Whether a live process holds ``path`` (a :func:`leased_temp_dir`); False for a
    directory that vanished meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock just taken
    return False


def check_out_dir(out_dir: str | Path, *,
                  fix: str = "choose another --out directory or remove it first") -> Path:
    """``out_dir`` if it is absent or an empty directory, checked before any work (and
    again before an output is renamed onto it).

    Raises:
        ConflictError: It exists and is a file or holds something, or it is a symbolic
            link: the output is renamed into place, and a rename replaces the link, not
            the directory it points at.
    """
    from registry.errors import ConflictError

    out = Path(out_dir)
    if out.is_symlink():
        raise ConflictError(f"{out} is a symbolic link; it is not followed",
                            fix="choose a real new or empty directory for --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file, not a directory" if not out.is_dir() else "already exists and is not empty"
        raise ConflictError(f"{out} {what}", fix=fix)
    return out


def check_outside(out_dir: str | Path, root: str | Path | None, what: str = "the store") -> None:
    """Refuse an output directory inside ``root`` (a local store: its files are its own, and
    a model written under ``names/`` would look like part of it).

    Raises:
        BadInputError: ``out_dir`` resolves to ``root`` or below it.
    """
    from registry.errors import BadInputError

    if root is None:
        return
    base, out = Path(root).resolve(), Path(out_dir).resolve()
    if out == base or base in out.parents:
        raise BadInputError(f"{out_dir} is inside {what} ({base})",
                            fix="write the output outside the store directory")


MAX_SMALL_FILE = 1 << 20
"""Largest key, checkpoint or similar small input file read (1 MiB; a PEM key is ~120 bytes)."""


def read_small_file(path: str | Path, what: str, *, fix: str, max_bytes: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a small input file named by the user (a key, a checkpoint).

    Opened without blocking and checked to be a regular file before anything is read, so a
    FIFO cannot hang the command and ``/dev/zero`` cannot fill the memory; at most
    ``max_bytes + 1`` bytes are read.

    Args:
        path: The file.
        what: What it is, for messages (``key file``).
        fix: The fix line of a refusal.
        max_bytes: Largest size accepted.

    Raises:
        NotFoundError: No such file (exit 5).
        BadInputError: Not a regular file, or larger than ``max_bytes`` (exit 2).
        EnvironmentFailure: Permission denied or an I/O error (exit 6).
    """
    import stat

    from registry.errors import BadInputError, NotFoundError, environment_error, shorten

    shown = shorten(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFoundError(f"{what} {shown} not found", fix=fix) from None
    except OSError as err:
        raise environment_error(err, path=path, action=f"read {what}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, device or directory
            raise BadInputError(f"{what} {shown} is not a regular file", fix=fix)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise environment_error(err, path=path, action=f"read {what}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadInputError(f"{what} {shown} is larger than {max_bytes} bytes", fix=fix)
    return data


def open_store_file(path: str | Path) -> BinaryIO:
    """Open a file inside a store for reading, refusing anything but a regular file.

    A FIFO put in place of a binding, a ref or ``audit/head.json`` hung every reader and
    writer; a symlink to ``/dev/zero`` read without end. The file is opened without
    blocking and checked with ``fstat`` before a byte is read.

    Raises:
        FileNotFoundError: No such file (also a dangling symlink), as ``open`` raises it.
        IntegrityError: It is a FIFO, a device, a socket or a directory (exit 3).
    """
    import stat

    from registry.errors import IntegrityError, shorten

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:  # a socket, or a device without a driver, cannot even be opened
        if err.errno not in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            raise
        raise IntegrityError(f"{shorten(str(path))} in the store is not a regular file "
                             "(a socket or device put there by hand?)",
                             fix="run `adapters verify --all`, then remove or restore it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{shorten(str(path))} in the store is not a regular file "
                                 "(a FIFO, device or directory put there by hand?)",
                                 fix="run `adapters verify --all`, then remove or restore it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: str | Path) -> bool:
    """Whether ``path`` is (or links to) a regular file: what a store listing may name."""
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
