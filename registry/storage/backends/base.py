"""Storage backends: where a store's objects live (a local directory or an S3 bucket).

The store is a flat namespace of *keys* (``blobs/sha256/<hex>``, ``names/<name>/versions/<hex>``,
``names/<name>/aliases/<alias>``, ``gates/<c>/<p>``, ``signatures/<v>/<k>``, ``config.json``,
``oci-layout``, ``audit/...``); a backend maps keys to bytes. The store only needs six operations
(:class:`Backend`): read with an entity tag, unconditional write, create-only write,
compare-and-swap write on the entity tag, list by prefix, stat, delete. Those are
exactly what S3-compatible object storage offers (``If-None-Match: *`` and ``If-Match``
on ``PutObject``), so the same store code is correct on one machine and across many:

* blobs, manifests and name bindings are written create-only
  (:meth:`Backend.put_if_absent`): a second writer of the same key gets
  :class:`PreconditionFailed` instead of overwriting;
* aliases and gate pointers move by compare-and-swap (:meth:`Backend.put_if_match` on
  the ETag read just before): a writer that lost the race gets :class:`PreconditionFailed`
  and re-reads, so no update is lost.

Error mapping (every backend raises only these for object-level outcomes):
:class:`ObjectMissing` (a :class:`~registry.errors.NotFoundError`) when a key does not
exist, :class:`PreconditionFailed` (a :class:`~registry.errors.ConflictError`) when a
conditional write lost. Transport and permission problems become
:class:`~registry.errors.BadInputError` with a fix (wrong endpoint, no credentials,
missing bucket).

This module holds only the contract (the protocol and its two outcomes), so both
implementations import it without importing each other;
:func:`registry.storage.backends.select.open_backend` picks one.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from registry.errors import ConflictError, NotFoundError


class ObjectMissing(NotFoundError):
    """The key does not exist in the backend."""


class PreconditionFailed(ConflictError):
    """A conditional write lost: the key exists (create-only) or its ETag changed (CAS)."""


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of one stored object.

    Attributes:
        size: Bytes.
        mtime: Last modification, seconds since the epoch.
        etag: Entity tag to pass to :meth:`Backend.put_if_match`.
    """

    size: int
    mtime: float
    etag: str


@runtime_checkable
class Backend(Protocol):
    """What the store needs from its storage medium (see the module docstring).

    Attributes:
        location: Human-readable store location (a path or ``s3://bucket/prefix``).
        local_root: A local directory for scratch files (``tmp/``) and lock files; for a
            local store it is the store itself, for S3 a per-store cache directory.
        supports_locks: True when :meth:`lock` really excludes other processes (local);
            False where conditional writes alone provide safety (S3).
    """

    location: str
    local_root: Path
    supports_locks: bool

    def get(self, key: str) -> tuple[bytes, str]:
        """``(data, etag)`` of a key. Raises ObjectMissing."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A binary stream of a key's bytes. Raises ObjectMissing."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Write unconditionally (atomically); returns the new etag."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create-only write; returns the etag. Raises PreconditionFailed if the key exists."""
        ...

    def put_file_if_absent(self, key: str, path: Path) -> bool:
        """Create-only write of a complete local file (consumed: moved or deleted).

        Returns False (and drops the file) when the key already exists.
        """
        ...

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Compare-and-swap write. Raises PreconditionFailed if the etag changed or the key
        is gone."""
        ...

    def delete(self, key: str, etag: str | None = None) -> bool:
        """Delete (only if the etag still matches, when given); False if it was absent.

        Raises PreconditionFailed when ``etag`` no longer matches."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (recursive), sorted."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Metadata of a key, or None if absent."""
        ...

    def touch(self, key: str) -> None:
        """Refresh a key's mtime (protects a re-used blob from gc's grace check)."""
        ...

    def local_path(self, key: str) -> Path:
        """A local filesystem path for a key. Raises BadInputError where there is none."""
        ...

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """A cross-process lock named ``name`` (a no-op where :attr:`supports_locks` is False)."""
        ...


__all__ = ["Backend", "ObjectInfo", "ObjectMissing", "PreconditionFailed"]
