"""The store: a local directory laid out like an OCI image layout, or the same keys on S3.

Layout (DESIGN.md has the authoritative copy; on S3 each path is an object key under
``s3://bucket/prefix``, see :mod:`registry.storage.backends`)::

    <root>/oci-layout, config.json
    <root>/blobs/sha256/<hex>                 file blobs, manifests, gate records (0444)
    <root>/names/<name>/versions/<hex>        binding name -> version (content: bind time)
    <root>/names/<name>/aliases/<alias>       "sha256:<hex>\\n"
    <root>/gates/<candidate-hex>/<policy-hex> digest of a gate-record blob
    <root>/signatures/<version-hex>/<keyid-hex>  digest of a DSSE signature-envelope blob
    <root>/audit/, locks/, tmp/

Crash safety of a push: file blobs and the manifest blob are written first (each
temp file + fsync + atomic rename, see :mod:`registry.storage.blobs`); the name binding is
written last, atomically. A push killed at any point leaves no visible version,
only unreachable blobs or temp files that :func:`registry.maintenance.collection.gc` removes
after the grace period. Lock order is gc (shared) -> refs -> audit
(:mod:`registry.storage.locking`); every change to names, aliases, gate records and signatures
happens under ``refs.lock`` through :func:`registry.audit.journal.run_mutation`: intent
marker, audit entry, change, marker removed. So the log orders alias moves exactly as
they happened, never shows a change it does not record, and the next writer settles
(rolls back, recording it) whatever a killed writer left half-done.

Composition: :class:`Store` is the read view :class:`registry.storage.reader.StoreReader`
(every query, the keys, the locks, the audit log) plus the writers, each a module of
functions over that view: :mod:`registry.storage.publish` (push),
:mod:`registry.storage.aliases` (aliases, unbinding, protected aliases),
:mod:`registry.storage.attachments` (gate records, signatures). The store picks the
backend (:mod:`registry.storage.backends`) and the audit log kind
(:class:`registry.audit.trail.AuditTrail`) once, when it is opened; nothing below
branches on them again.

Every write goes through the backend's conditional operations, so the same code is
safe without locks on S3: blobs, manifests and bindings are created with
``put_if_absent``; aliases, gate and signature pointers move with ``put_if_match`` on the ETag
just read, re-reading on :class:`~registry.storage.backends.base.PreconditionFailed` (an ``expect``
that no longer holds then raises ConflictError). Locally the flock locks above are
still taken (the backend's ``lock``), which also keeps the audit log in move order; on
S3 they are no-ops and the audit log is one object per entry
(:mod:`registry.audit.objects`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from registry.audit.log import AuditLog
from registry.audit.objects import ObjectAuditLog
from registry.audit.trail import AuditTrail
from registry.digests import canonical_json
from registry.errors import BadInputError, NotFoundError
from registry.fsutil import make_dirs
from registry.progress import ProgressCallback
from registry.storage import aliases, attachments
from registry.storage.backends.base import Backend, PreconditionFailed
from registry.storage.backends.local import LocalBackend
from registry.storage.backends.select import check_not_url, open_backend, s3_location
from registry.storage.blobs import BlobStore
from registry.storage.manifest import ADAPTER_ARTIFACT, MODEL_ARTIFACT, PushResult, Version
from registry.storage.publish import push_version
from registry.storage.reader import DEFAULT_CONFIG, StoreReader
from registry.storage.refs import validate_file_path
from registry.storage.refwrite import ANY

__all__ = ["ADAPTER_ARTIFACT", "ANY", "DEFAULT_CONFIG", "MODEL_ARTIFACT", "PushResult", "Store",
           "Version", "default_root"]


def default_root() -> Path:
    """``$ADAPTERS_HOME`` or ``~/.adapters``."""
    return Path(os.environ.get("ADAPTERS_HOME") or Path.home() / ".adapters").expanduser()


def _audit_trail(backend: Backend) -> AuditTrail:
    """The audit log kind that fits the backend (JSONL + flock locally, objects on S3)."""
    return AuditLog(backend.root) if isinstance(backend, LocalBackend) else ObjectAuditLog(backend)


class Store(StoreReader):
    """A content-addressed adapter store (local directory or S3-compatible bucket).

    Queries (``resolve``, ``versions``, ``names``, ``aliases``, ``gate_record``,
    ``load_manifest``...) come from :class:`registry.storage.reader.StoreReader`; the
    writing methods below delegate to the writer modules (see the module docstring).

    Args:
        root: The store directory or ``s3://bucket/prefix`` (use :meth:`open` to check
            or create it).
        backend: An already-built backend (instead of ``root``).

    Raises:
        BadInputError: Neither ``root`` nor ``backend``, or a malformed S3 location.
    """

    def __init__(self, root: str | Path | None = None, *, backend: Backend | None = None) -> None:
        if backend is None:
            if root is None:
                raise BadInputError("Store needs a root or a backend", fix="use Store.open()")
            backend = open_backend(root)
        super().__init__(backend, BlobStore(backend), _audit_trail(backend))

    # ---- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path | None = None, *, create: bool = False) -> "Store":
        """Open the store at ``root`` (None: ``$ADAPTERS_HOME`` or ``~/.adapters``).

        Args:
            root: Store directory.
            create: Initialise it if missing (idempotent on an existing store).

        Raises:
            NotFoundError: No store there and ``create`` is False.
            BadInputError: ``create`` on a non-empty directory that is not a store.
        """
        home = os.environ.get("ADAPTERS_HOME", "")
        if root is None and s3_location(home) is not None:
            root = home  # $ADAPTERS_HOME=s3://bucket/prefix, as --store takes it
        if root is not None and s3_location(root) is not None:
            return cls._open_objects(cls(backend=open_backend(root)), create)
        path = Path(root).expanduser() if root is not None else default_root()
        check_not_url(path)
        if (path / "oci-layout").is_file():
            return cls(path)
        if not create:
            raise NotFoundError(f"no adapter store at {path}",
                                fix="run `adapters init` (or pass --store / set $ADAPTERS_HOME)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise BadInputError(f"{path} exists and is not an adapter store",
                                fix="pick an empty or new directory for the store")
        store = cls(path)
        store._initialise()
        return store

    @classmethod
    def _open_objects(cls, store: "Store", create: bool) -> "Store":
        if store.backend.stat("oci-layout") is not None:
            return store
        if not create:
            raise NotFoundError(f"no adapter store at {store.location}",
                                fix=f"run `adapters init {store.location}`")
        if store.backend.list(""):
            raise BadInputError(f"{store.location} holds objects but is not an adapter store",
                                fix="pick an empty or new prefix, e.g. s3://bucket/adapters")
        store._initialise()
        return store

    def _initialise(self) -> None:
        subs = ("blobs/sha256", "names", "gates", "audit", "locks", "tmp") \
            if isinstance(self.backend, LocalBackend) else ("tmp",)
        for sub in subs:
            make_dirs(self.root / sub)
        try:
            self.backend.put_if_absent("config.json", canonical_json(DEFAULT_CONFIG))
        except PreconditionFailed:
            pass  # an existing config (or a concurrent init's) is kept
        self._audit.append("init", self.location, new={"layout": "1.0.0"})
        self.backend.put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')

    # ---- writing (delegated to the writer modules) -----------------------------------

    def push(self, name: str, files: Mapping[str, Path], record: dict, *,
             lineage: dict | None = None, artifact_type: str = ADAPTER_ARTIFACT,
             actor: str | None = None, progress: ProgressCallback | None = None) -> PushResult:
        """Store files, write the manifest, bind the name, audit ``push``.

        See :func:`registry.storage.publish.push_version` (arguments and result).

        Raises:
            BadInputError: Bad name, file path, record, lineage or artifact type.
            NotFoundError: A lineage parent is not in the store, or a source file is missing.
            OSError: A source file cannot be read.
        """
        return push_version(self, name, files, record, lineage=lineage,
                            artifact_type=artifact_type, actor=actor, progress=progress)

    def record_derived(self, name: str, record: dict, lineage: dict, *,
                       actor: str | None = None) -> PushResult:
        """Record a derived full model by reference (no weights copied).

        Used for merge-and-unload / requantization outputs: the version carries a
        ``kind: "model"`` record (see :func:`registry.record.build_model_record`, whose
        ``weights`` fingerprint identifies the bytes) and the lineage to its inputs.

        Raises:
            BadInputError: The record is not a valid model record or lineage is missing.
            NotFoundError: A lineage parent is not in the self.
        """
        if not lineage:
            raise BadInputError("a derived model needs lineage (its parents and recipe)",
                                fix="pass lineage=make_lineage([...], method=...)")
        return self.push(name, {}, record, lineage=lineage, artifact_type=MODEL_ARTIFACT,
                         actor=actor)

    def set_alias(self, name: str, alias: str, digest: str, *, expect: Any = ANY,
                  actor: str | None = None, action: str = "alias",
                  protected_ok: bool = False,
                  notes: Sequence[tuple[str, Any]] = (),
                  still_valid: Callable[[], None] | None = None) -> str | None:
        """Point ``name:alias`` at a version of ``name`` by compare-and-swap.

        See :func:`registry.storage.aliases.set_alias` (arguments and result).

        Raises:
            GateFailedError: ``alias`` is protected and ``protected_ok`` is False.
            ConflictError: ``expect`` does not match the current value.
            NotFoundError: The target is not a version of ``name``.
            BadInputError: Bad name, alias or digest.
        """
        return aliases.set_alias(self, name, alias, digest, expect=expect, actor=actor,
                                 action=action, protected_ok=protected_ok, notes=notes,
                                 still_valid=still_valid)

    def delete_alias(self, name: str, alias: str, *, expect: Any = ANY,
                     actor: str | None = None, protected_ok: bool = False) -> str | None:
        """Remove an alias by compare-and-swap, audited ``alias``.

        See :func:`registry.storage.aliases.delete_alias`.

        Raises:
            GateFailedError: Protected alias without ``protected_ok``.
            ConflictError: ``expect`` does not match.
        """
        return aliases.delete_alias(self, name, alias, expect=expect, actor=actor,
                                    protected_ok=protected_ok)

    def delete_version(self, ref: str, *, actor: str | None = None) -> Version:
        """Unbind a version from its name, audited ``delete``.

        See :func:`registry.storage.aliases.delete_version`.

        Raises:
            ConflictError: An alias still points at it.
            NotFoundError: No such version.
        """
        return aliases.delete_version(self, ref, actor=actor)

    def put_gate_record(self, candidate: str, policy_digest: str, result: dict, *,
                        actor: str | None = None) -> str:
        """Store a gate result for (candidate version, policy) and audit ``gate``.

        See :func:`registry.storage.attachments.put_gate_record`.

        Raises:
            NotFoundError: Unknown candidate.
            BadInputError: Bad policy digest or non-JSON result.
        """
        return attachments.put_gate_record(self, candidate, policy_digest, result, actor=actor)

    def add_signature(self, version: str | Version, envelope: dict[str, Any], *,
                      actor: str | None = None) -> dict[str, str]:
        """Store a DSSE signature envelope beside ``version`` and audit ``sign``.

        See :func:`registry.storage.attachments.add_signature`.

        Raises:
            BadInputError: Malformed envelope, or it binds another name or digest.
            NotFoundError: Unknown version.
        """
        return attachments.add_signature(self, version, envelope, actor=actor)

    # ---- blobs -------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob and return its digest (unreachable until referenced)."""
        with self.lock("gc", shared=True):
            return self.blobs.put_bytes(data)[0]

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for reading. Raises NotFoundError if missing."""
        return self.blobs.open(digest)

    def materialize(self, ref_or_version: str | Version, dest: Path, *,
                    progress: ProgressCallback | None = None) -> Path:
        """Write a version's files into ``dest`` (a plain PEFT directory), verifying digests.

        Existing files of the same names in ``dest`` are replaced; each file is written
        to a temp file in its directory and renamed only once its digest checks out.

        Raises:
            IntegrityError: A blob is missing or corrupt (the bad file is not written).
            BadInputError: The version has no files (a model recorded by reference).
            NotFoundError: Unknown ref.
        """
        version = ref_or_version if isinstance(ref_or_version, Version) \
            else self.resolve(ref_or_version)
        if not version.files:
            raise BadInputError(f"{version.ref} has no stored files (recorded by reference)",
                                fix="its record's 'location' says where the model was written")
        dest = Path(dest)
        make_dirs(dest)
        for entry in version.files:
            self.blobs.copy_verified(entry["digest"], dest / validate_file_path(entry["path"]),
                                     progress)
        return dest
