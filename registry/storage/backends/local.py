"""Local-directory backend: each key is the file ``<root>/<key>`` (the layout in DESIGN.md).

Writes keep the crash-safety rules of the original store: every write goes to a temp
file in the target's directory, is fsynced and renamed into place, so readers see the
old or the complete new bytes. Keys under ``blobs/`` (content-addressed, immutable) are
made read-only (0444) before they appear.

Create-only writes use ``os.link`` from the finished temp file, which fails atomically
when the name exists, so two processes writing the same blob never both "create" it
(where the filesystem has no hard links we fall back to check-then-rename, which is
still correct for content-addressed keys). Compare-and-swap writes compare the etag
(sha256 of the current bytes) and then rename: that pair is atomic only because
:class:`registry.storage.store.Store` does every ref change under ``locks/refs.lock``
(:meth:`LocalBackend.lock`), which processes on one machine share through ``flock``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from registry.errors import BadInputError
from registry.fsutil import (atomic_write_bytes, fsync_dir, is_regular_file, make_dirs,
                             open_store_file, unlink_quietly)
from registry.storage.backends.base import ObjectInfo, ObjectMissing, PreconditionFailed
from registry.storage.locking import file_lock

IMMUTABLE_PREFIX = "blobs/"


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBackend:
    """Objects as files under ``root``.

    Args:
        root: The store directory.
    """

    supports_locks = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.local_root = self.root
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BadInputError(f"invalid store key {key!r}", fix="report this as a bug")
        return self.root.joinpath(*parts)

    def local_path(self, key: str) -> Path:
        """The file holding ``key`` (it may not exist)."""
        return self._path(key)

    def get(self, key: str) -> tuple[bytes, str]:
        """``(data, etag)``. Raises ObjectMissing."""
        try:
            with open_store_file(self._path(key)) as handle:
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"{key} is missing", fix="run `adapters verify --all`") from None
        return data, _etag(data)

    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for binary reading. Raises ObjectMissing."""
        try:
            return open_store_file(self._path(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"{key} is missing", fix="run `adapters verify --all`") from None

    def _mode(self, key: str) -> int:
        return 0o444 if key.startswith(IMMUTABLE_PREFIX) else 0o644

    def put(self, key: str, data: bytes) -> str:
        """Atomic replace (temp file, fsync, rename)."""
        atomic_write_bytes(self._path(key), data, mode=self._mode(key))
        return _etag(data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create-only write. Raises PreconditionFailed if ``key`` exists."""
        self._path(key)  # validate before writing anything
        tmp_dir = self.root / "tmp"  # same filesystem; gc removes what a crash leaves here
        make_dirs(tmp_dir)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="obj-", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        if not self._link_into_place(key, Path(tmp)):
            raise PreconditionFailed(f"{key} already exists", fix="re-read it and retry")
        return _etag(data)

    def put_file_if_absent(self, key: str, path: Path) -> bool:
        """Move a complete, fsynced local file to ``key`` unless it exists (file consumed)."""
        return self._link_into_place(key, Path(path))

    def _link_into_place(self, key: str, tmp: Path) -> bool:
        final = self._path(key)
        try:
            make_dirs(final.parent)
            os.chmod(tmp, self._mode(key))
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError as err:  # no hard links here: check, then rename
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if final.exists():
                    return False
                os.replace(tmp, final)
            fsync_dir(final.parent)
            return True
        finally:
            unlink_quietly(tmp)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Compare-and-swap (atomic under the store's refs lock). Raises PreconditionFailed."""
        try:
            _, current = self.get(key)
        except ObjectMissing:
            raise PreconditionFailed(f"{key} was deleted", fix="re-read it and retry") from None
        if current != etag:
            raise PreconditionFailed(f"{key} changed", fix="re-read it and retry")
        return self.put(key, data)

    def delete(self, key: str, etag: str | None = None) -> bool:
        """Remove ``key``; False if absent. Raises PreconditionFailed on an etag mismatch."""
        if etag is not None:
            try:
                if self.get(key)[1] != etag:
                    raise PreconditionFailed(f"{key} changed", fix="re-read it and retry")
            except ObjectMissing:
                return False
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (temp files of interrupted writes are skipped)."""
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(base_key) if base_key else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in files:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                # only regular files are objects: a dangling symlink or a FIFO put in
                # place of a binding is absent (verify reports it `removed`), rather
                # than breaking every listing
                if key.startswith(prefix) and is_regular_file(os.path.join(dirpath, name)):
                    out.append(key)
        return sorted(out)

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and mtime; the etag is left empty (computing it would read the file)."""
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(size=st.st_size, mtime=st.st_mtime, etag="")

    def touch(self, key: str) -> None:
        """Refresh the mtime (best effort)."""
        try:
            os.utime(self._path(key))
        except OSError:
            pass

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """``flock`` on ``locks/<name>.lock``."""
        return file_lock(self.root / "locks" / f"{name}.lock", shared=shared)
