"""Content-addressed blob storage: the keys ``blobs/sha256/<hex>`` of a storage backend.

A file blob is copied into a local temp file under ``<local root>/tmp/`` while it is
hashed (1 MiB chunks, one read pass), fsynced, and then committed create-only to its
key (:meth:`registry.storage.backends.base.Backend.put_file_if_absent`: a hard link for a local
store, ``PutObject(IfNoneMatch="*")`` for S3). Hashing the temp copy, not the source,
guarantees the stored bytes are the hashed bytes. A process killed mid-copy leaves
only a temp file (gc removes stale ones), never a partial blob. If the blob already
exists the temp file is dropped (deduplication: no new bytes) and the existing blob's
mtime is refreshed, so a concurrent gc's grace period protects a blob being re-used.

On a local store blobs are files under ``<root>/blobs/sha256/`` with mode 0444;
:meth:`BlobStore.path` gives their path. S3 blobs have no local path (``path`` raises
BadInputError); read them with :meth:`BlobStore.open` or :meth:`BlobStore.copy_verified`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from registry.digests import DIGEST_PREFIX, HEX_RE, digest_hex, sha256_digest
from registry.errors import IntegrityError, NotFoundError
from registry.fsutil import make_dirs, unlink_quietly
from registry.progress import ProgressCallback
from registry.storage.backends.base import Backend, ObjectMissing, PreconditionFailed

CHUNK = 1 << 20
PREFIX = "blobs/sha256/"


def blob_key(digest: str) -> str:
    """The backend key of a blob (``BadInputError`` on a malformed digest)."""
    return PREFIX + digest_hex(digest)


class BlobStore:
    """The blobs of a store, on any backend.

    Args:
        backend: The store's backend (a ``Path`` means a local directory store).
    """

    def __init__(self, backend: Backend | Path) -> None:
        if isinstance(backend, (str, Path)):
            from registry.storage.backends.local import LocalBackend
            backend = LocalBackend(Path(backend))
        self.backend = backend
        self.tmp = backend.local_root / "tmp"

    def path(self, digest: str) -> Path:
        """Local file of the blob with ``digest`` (it may not exist).

        Raises:
            BadInputError: ``digest`` is not a full sha256 digest, or the store is on S3.
        """
        return self.backend.local_path(blob_key(digest))

    def exists(self, digest: str) -> bool:
        """Whether the blob is present (its content is not checked)."""
        return self.backend.stat(blob_key(digest)) is not None

    def size(self, digest: str) -> int | None:
        """Size in bytes, None when missing."""
        info = self.backend.stat(blob_key(digest))
        return None if info is None else info.size

    def open(self, digest: str) -> BinaryIO:
        """Open a blob for binary reading.

        Raises:
            NotFoundError: No such blob.
        """
        try:
            return self.backend.open(blob_key(digest))
        except ObjectMissing:
            raise NotFoundError(f"blob {digest} is missing",
                                fix="run `adapters verify --all` to see what uses it") from None

    def read(self, digest: str) -> bytes:
        """A blob's bytes, unchecked. Raises NotFoundError."""
        try:
            return self.backend.get(blob_key(digest))[0]
        except ObjectMissing:
            raise NotFoundError(f"blob {digest} is missing",
                                fix="run `adapters verify --all`") from None

    def read_verified(self, digest: str) -> bytes:
        """Read a (small) blob whole and check its digest.

        Raises:
            IntegrityError: The blob is missing or its bytes do not hash to ``digest``.
        """
        try:
            data = self.backend.get(blob_key(digest))[0]
        except ObjectMissing:
            raise IntegrityError(f"blob {digest} is missing",
                                 fix="run `adapters verify --all`; re-push the affected version") \
                from None
        if sha256_digest(data) != digest:
            raise IntegrityError(f"blob {digest} is corrupt (content hash differs)",
                                 fix="run `adapters verify --all`; re-push the affected version")
        return data

    def _temp(self) -> tuple[int, str]:
        make_dirs(self.tmp)
        return tempfile.mkstemp(dir=self.tmp, prefix="blob-", suffix=".partial")

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
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                hexdigest, size = _copy_hashing(src, dst, progress)
            key = PREFIX + hexdigest
            created = self.backend.put_file_if_absent(key, Path(tmp))
            if not created:
                self.backend.touch(key)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return DIGEST_PREFIX + hexdigest, size, size if created else 0

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store a small blob create-only; returns ``(digest, created)``."""
        digest = sha256_digest(data)
        key = blob_key(digest)
        if self.backend.stat(key) is None:
            try:
                self.backend.put_if_absent(key, data)
                return digest, True
            except PreconditionFailed:
                pass  # a concurrent writer stored the same bytes first
        self.backend.touch(key)
        return digest, False

    def hash_blob(self, digest: str, progress: ProgressCallback | None = None) -> str | None:
        """Re-hash a stored blob; None when it is missing."""
        try:
            handle = self.backend.open(blob_key(digest))
        except ObjectMissing:
            return None
        with handle:
            hexdigest, _ = _copy_hashing(handle, None, progress)
        return DIGEST_PREFIX + hexdigest

    def copy_verified(self, digest: str, dest: Path,
                      progress: ProgressCallback | None = None) -> int:
        """Copy a blob to ``dest`` (via ``dest``'s directory temp file), checking its digest.

        Returns:
            Bytes written.

        Raises:
            IntegrityError: The blob is missing or does not hash to ``digest``.
        """
        key = blob_key(digest)
        make_dirs(dest.parent)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
        try:
            try:
                src = self.backend.open(key)
            except ObjectMissing:
                raise IntegrityError(f"blob {digest} is missing (needed for {dest.name})",
                                     fix="run `adapters verify --all`; re-push the version") \
                    from None
            with src, os.fdopen(fd, "wb") as dst:
                hexdigest, size = _copy_hashing(src, dst, progress)
            if DIGEST_PREFIX + hexdigest != digest:
                raise IntegrityError(f"blob {digest} is corrupt (needed for {dest.name})",
                                     fix="run `adapters verify --all`; re-push the version")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return size

    def all_digests(self) -> list[str]:
        """Digests of every blob key with a well-formed name, sorted."""
        out = []
        for key in self.backend.list(PREFIX):
            name = key[len(PREFIX):]
            if HEX_RE.match(name):
                out.append(DIGEST_PREFIX + name)
        return sorted(out)


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None,
                  progress: ProgressCallback | None) -> tuple[str, int]:
    """Read ``src`` to the end in :data:`CHUNK` pieces, hashing each and writing it to
    ``dst`` (None: hash only); ``dst`` is flushed and fsynced. Returns ``(hex, size)``."""
    hasher = hashlib.sha256()
    size = 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        hasher.update(chunk)
        if dst is not None:
            dst.write(chunk)
        size += len(chunk)
        if progress is not None:
            progress(len(chunk))
    if dst is not None:
        dst.flush()
        os.fsync(dst.fileno())
    return hasher.hexdigest(), size
