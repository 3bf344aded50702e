"""Content-addressed blob storage: ``<root>/blobs/sha256/<hex>``.

A blob is written by copying its source into a temp file under ``<root>/tmp/``
while hashing it (1 MiB chunks, one read pass), then ``fsync``, ``chmod 0444`` and an
atomic ``os.replace`` onto its final name. A process killed mid-copy therefore
leaves only a temp file (which is not a blob; gc removes stale ones), never a
partial file under ``blobs/``. If the blob already exists the temp file is dropped
(deduplication: no new bytes) and the existing blob's mtime is refreshed, so a
concurrent gc's grace period protects a blob that is being re-used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from registry.common import DIGEST_PREFIX, digest_hex, fsync_dir, sha256_digest
from registry.errors import IntegrityError, NotFoundError

CHUNK = 1 << 20
ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just processed."""


class BlobStore:
    """The ``blobs/`` and ``tmp/`` directories of a store.

    Args:
        root: The store root.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives (it may not exist).

        Raises:
            BadInputError: ``digest`` is not a full sha256 digest.
        """
        return self.dir / digest_hex(digest)

    def exists(self, digest: str) -> bool:
        """Whether the blob is present (its content is not checked)."""
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        """Open a blob for binary reading.

        Raises:
            NotFoundError: No such blob.
        """
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing",
                                fix="run `adapters verify --all` to see what uses it") from None

    def read_verified(self, digest: str) -> bytes:
        """Read a (small) blob whole and check its digest.

        Raises:
            IntegrityError: The blob is missing or its bytes do not hash to ``digest``.
        """
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest} is missing",
                                 fix="run `adapters verify --all`; re-push the affected version") \
                from None
        if sha256_digest(data) != digest:
            raise IntegrityError(f"blob {digest} is corrupt (content hash differs)",
                                 fix="run `adapters verify --all`; re-push the affected version")
        return data

    def _temp(self) -> tuple[int, str]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=self.tmp, prefix="blob-", suffix=".partial")

    def _commit(self, tmp: str, hexdigest: str) -> bool:
        """Move a complete, fsynced temp file into place; False when it already existed."""
        final = self.dir / hexdigest
        if final.is_file():
            os.unlink(tmp)
            try:
                os.utime(final)
            except OSError:
                pass
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        return True

    def put_file(self, source: Path,
                 progress: ProgressCallback | None = None) -> tuple[str, int, int]:
        """Store a file's bytes, hashing while copying.

        Args:
            source: File to store.
            progress: Called with the byte count of each chunk copied.

        Returns:
            ``(digest, size, new_bytes)``; ``new_bytes`` is 0 when the blob existed.

        Raises:
            OSError: The source cannot be read.
        """
        fd, tmp = self._temp()
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            created = self._commit(tmp, hasher.hexdigest())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return DIGEST_PREFIX + hasher.hexdigest(), size, size if created else 0

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store a small blob; returns ``(digest, created)``."""
        digest = sha256_digest(data)
        if self.exists(digest):
            try:
                os.utime(self.path(digest))
            except OSError:
                pass
            return digest, False
        fd, tmp = self._temp()
        try:
            with os.fdopen(fd, "wb") as dst:
                dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
            created = self._commit(tmp, digest_hex(digest))
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return digest, created

    def hash_blob(self, digest: str, progress: ProgressCallback | None = None) -> str | None:
        """Re-hash a stored blob; None when it is missing."""
        hasher = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as handle:
                while True:
                    chunk = handle.read(CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except FileNotFoundError:
            return None
        return DIGEST_PREFIX + hasher.hexdigest()

    def copy_verified(self, digest: str, dest: Path,
                      progress: ProgressCallback | None = None) -> int:
        """Copy a blob to ``dest`` (via ``dest``'s directory temp file), checking its digest.

        Returns:
            Bytes written.

        Raises:
            IntegrityError: The blob is missing or does not hash to ``digest``.
        """
        src_path = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        hasher = hashlib.sha256()
        size = 0
        try:
            try:
                src = open(src_path, "rb")
            except FileNotFoundError:
                raise IntegrityError(f"blob {digest} is missing (needed for {dest.name})",
                                     fix="run `adapters verify --all`; re-push the version") \
                    from None
            with src, os.fdopen(fd, "wb") as dst:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            if DIGEST_PREFIX + hasher.hexdigest() != digest:
                raise IntegrityError(f"blob {digest} is corrupt (needed for {dest.name})",
                                     fix="run `adapters verify --all`; re-push the version")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return size

    def all_digests(self) -> list[str]:
        """Digests of every file under ``blobs/sha256`` with a well-formed name."""
        if not self.dir.is_dir():
            return []
        out = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                out.append(DIGEST_PREFIX + name)
        return sorted(out)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
