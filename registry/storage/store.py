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

Protected aliases (``config.json`` ``protected_aliases``, default ``["release"]``)
can only be moved with ``set_alias(..., protected_ok=True)``, which the gate's
``promote`` passes after it has checked a passing gate record.

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

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from registry.audit.log import AuditLog
from registry.audit.objects import ObjectAuditLog
from registry.storage.backends.base import Backend
from registry.storage.backends.base import ObjectMissing
from registry.storage.backends.base import PreconditionFailed
from registry.storage.backends.select import open_backend
from registry.storage.backends.select import s3_location
from registry.storage.backends.local import LocalBackend
from registry.progress import ProgressCallback
from registry.storage.blobs import BlobStore
from registry.digests import canonical_json
from registry.digests import digest_hex
from registry.digests import is_digest
from registry.fsutil import make_dirs
from registry.stamps import utc_now_iso
from registry.storage.failpoints import failpoint
from registry.audit.journal import recover, run_mutation
from registry.errors import (AdapterkitError, BadInputError, ConflictError, GateFailedError,
                             NotFoundError)
from registry.lineage import validate_lineage
from registry.storage.manifest import (ADAPTER_ARTIFACT, ARTIFACT_TYPES, MODEL_ARTIFACT, PushResult,
                               Version, build_manifest, content_key)
from registry.record import validate_record
from registry.storage.refwrite import ANY, cas_ref, claim_content, release_claim
from registry.storage.refs import validate_alias, validate_file_path, validate_name
from registry.storage.attachments import StoreFiles

__all__ = ["ADAPTER_ARTIFACT", "ANY", "DEFAULT_CONFIG", "MODEL_ARTIFACT", "ProgressCallback",
           "PushResult", "Store", "Version", "default_root"]

DEFAULT_CONFIG: dict[str, Any] = {"protected_aliases": ["release"]}


def default_root() -> Path:
    """``$ADAPTERS_HOME`` or ``~/.adapters``."""
    return Path(os.environ.get("ADAPTERS_HOME") or Path.home() / ".adapters").expanduser()


class Store(StoreFiles):
    """A content-addressed adapter store (local directory or S3-compatible bucket).

    Read-side methods (``resolve``, ``versions``, ``names``, ``aliases``, ``gate_record``,
    ``load_manifest``...) come from :class:`registry.storage.reader.StoreReader`.

    Args:
        root: The store directory or ``s3://bucket/prefix`` (use :meth:`open` to check
            or create it).
        backend: An already-built backend (instead of ``root``).
    """

    def __init__(self, root: str | Path | None = None, *, backend: Backend | None = None) -> None:
        if backend is None:
            if root is None:
                raise BadInputError("Store needs a root or a backend", fix="use Store.open()")
            backend = open_backend(root)
        super().__init__(backend, BlobStore(backend))
        self._audit: AuditLog | ObjectAuditLog = (
            AuditLog(backend.root) if isinstance(backend, LocalBackend)
            else ObjectAuditLog(backend))

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
        if root is not None and s3_location(root) is not None:
            return cls._open_objects(cls(backend=open_backend(root)), create)
        path = Path(root).expanduser() if root is not None else default_root()
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

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` merged over the defaults.

        Raises:
            BadInputError: config.json is not valid JSON.
        """
        try:
            data = json.loads(self.backend.get("config.json")[0])
        except ObjectMissing:
            data = {}
        except ValueError as err:
            raise BadInputError(f"{self.location}/config.json is not valid JSON: {err}",
                                fix="restore the file or re-create it") from err
        return {**DEFAULT_CONFIG, **(data if isinstance(data, dict) else {})}

    @property
    def protected_aliases(self) -> list[str]:
        """Aliases that only ``promote`` (``protected_ok=True``) may move."""
        return list(self.config.get("protected_aliases") or [])

    def audit(self) -> AuditLog | ObjectAuditLog:
        """The store's audit log (JSONL locally, one object per entry on S3)."""
        return self._audit

    # ---- writing -----------------------------------------------------------------

    def push(self, name: str, files: Mapping[str, Path], record: dict, *,
             lineage: dict | None = None, artifact_type: str = ADAPTER_ARTIFACT,
             actor: str | None = None, progress: ProgressCallback | None = None) -> PushResult:
        """Store files (deduplicated), write the manifest, bind the name, audit ``push``.

        Args:
            name: Name to bind (``name`` or ``org/name``).
            files: Path inside the version -> local file to store.
            record: Adapter/model record (validated and normalised here).
            lineage: Optional ``{"parents", "recipe", "report"}``; parent digests must
                be versions in this store.
            artifact_type: :data:`ADAPTER_ARTIFACT` or :data:`MODEL_ARTIFACT` (must
                match ``record["kind"]``).
            actor: Who pushes (default ``$ADAPTERS_ACTOR`` / login name).
            progress: Called with the bytes hashed per chunk.

        Returns:
            A :class:`PushResult`; ``created`` is False (and nothing new is bound) when
            identical files and record (ignoring ``record["created"]``) already exist.

        Raises:
            BadInputError: Bad name, file path, record, lineage or artifact type.
            NotFoundError: A lineage parent is not in the store, or a source file is missing.
            OSError: A source file cannot be read.
        """
        validate_name(name)
        if artifact_type not in ARTIFACT_TYPES:
            raise BadInputError(f"unknown artifact type {artifact_type!r}",
                                fix=f"use one of {', '.join(ARTIFACT_TYPES)}")
        record = validate_record(record)
        if record["kind"] != ARTIFACT_TYPES[artifact_type]:
            raise BadInputError(f"record kind {record['kind']!r} does not match artifact type "
                                f"{artifact_type}", fix="build a model record for MODEL_ARTIFACT")
        lineage = validate_lineage(lineage)
        if lineage is not None:
            for parent in lineage["parents"]:
                self.version_by_digest(parent["digest"])
        sources = {validate_file_path(path): Path(src) for path, src in files.items()}
        for path, src in sources.items():
            if not src.is_file():
                raise NotFoundError(f"{src} (for {path}) is not a readable file",
                                    fix="check the adapter directory")
        with self._lock("gc", shared=True):
            entries, new_bytes = [], 0
            for path in sorted(sources):
                digest, size, written = self.blobs.put_file(sources[path], progress)
                entries.append({"path": path, "digest": digest, "size": size})
                new_bytes += written
            failpoint("push.after_blobs")
            manifest = build_manifest(name, entries, record, lineage, artifact_type)
            key = content_key(manifest)
            with self._lock("refs"):
                recover(self, actor=actor)
                existing = self._same_content(name, key)
                if existing is not None:
                    return PushResult(existing, False, new_bytes)
                digest, _ = self.blobs.put_bytes(canonical_json(manifest))
                winner = claim_content(self.backend, name, key, digest,
                                       lambda d: self.is_bound(name, d),
                                       wait=0 if self.backend.supports_locks else None)
                if winner is not None:  # a concurrent identical push got there first
                    return PushResult(self._version(name, digest_hex(winner)), False, new_bytes)
                created = utc_now_iso()
                version = Version(name, digest, manifest, created)
                binding = self._binding_key(name, digest_hex(digest))
                try:
                    run_mutation(self, "push", version.ref, old=None, new=digest, actor=actor,
                                 apply=lambda: self.backend.put_if_absent(
                                     binding, (created + "\n").encode()))
                except PreconditionFailed:  # a concurrent identical push bound it first
                    return PushResult(self._version(name, digest_hex(digest)), False, new_bytes)
        return PushResult(version, True, new_bytes)

    def _same_content(self, name: str, key: str) -> Version | None:
        for hexdigest in self._bound_hexes(name):
            try:
                version = self._version(name, hexdigest)
            except AdapterkitError:  # a damaged old version must not block new pushes
                continue
            if content_key(version.manifest) == key:
                return version
        return None

    def record_derived(self, name: str, record: dict, lineage: dict, *,
                       actor: str | None = None) -> PushResult:
        """Record a derived full model by reference (no weights copied).

        Used for merge-and-unload / requantization outputs: the version carries a
        ``kind: "model"`` record (see :func:`registry.record.build_model_record`, whose
        ``weights`` fingerprint identifies the bytes) and the lineage to its inputs.

        Raises:
            BadInputError: The record is not a valid model record or lineage is missing.
            NotFoundError: A lineage parent is not in the store.
        """
        if not lineage:
            raise BadInputError("a derived model needs lineage (its parents and recipe)",
                                fix="pass lineage=make_lineage([...], method=...)")
        return self.push(name, {}, record, lineage=lineage, artifact_type=MODEL_ARTIFACT,
                         actor=actor)

    def _expect_digest(self, name: str, expect: Any) -> Any:
        if expect is ANY or expect is None or is_digest(expect):
            return expect
        if isinstance(expect, str):
            return self.resolve(f"{name}@{expect}").digest
        raise BadInputError(f"expect must be a digest, None or ANY, got {expect!r}",
                            fix="pass the alias's current digest")

    def set_alias(self, name: str, alias: str, digest: str, *, expect: Any = ANY,
                  actor: str | None = None, action: str = "alias",
                  protected_ok: bool = False,
                  notes: Sequence[tuple[str, Any]] = ()) -> str | None:
        """Point ``name:alias`` at a version of ``name`` by compare-and-swap.

        Args:
            name: The name.
            alias: Alias to move (e.g. ``candidate``).
            digest: Target version: full digest, digest prefix or a ref of the same name.
            expect: :data:`ANY` (no check), None (alias must not exist yet) or the digest
                (or unique prefix) the alias must currently point to.
            actor: Who moves it.
            action: Audit action (``alias``; the gate's promote passes ``promote``).
            protected_ok: Allow moving a protected alias (only the gate's promote does).
            notes: Extra ``(action, value)`` audit entries logged with the move (a forced
                promotion's reason), before the alias is written.

        Returns:
            The previous digest, or None if the alias did not exist. Moving an alias to
            where it already points is a no-op (not audited).

        Raises:
            GateFailedError: ``alias`` is protected and ``protected_ok`` is False.
            ConflictError: ``expect`` does not match the current value (the message and
                fix say what it is now).
            NotFoundError: The target is not a version of ``name``.
            BadInputError: Bad name, alias or digest.
        """
        validate_name(name)
        validate_alias(alias)
        if alias in self.protected_aliases and not protected_ok:
            raise GateFailedError(f"alias {alias!r} is protected; only a passing gate moves it",
                                  fix=f"run `adapters promote {name}@<digest> --to {alias}`")
        target = self._target_digest(name, digest)
        expect = self._expect_digest(name, expect)
        key = self._alias_key(name, alias)

        def conflict(current: str | None) -> ConflictError:
            return ConflictError(
                f"alias {name}:{alias} points to {current or 'nothing'}, "
                f"expected {expect or 'nothing (new alias)'}",
                fix=f"re-read the alias and retry with expect={current or 'none'}")

        def audited(old: str | None, write: Callable[[], None]) -> None:
            run_mutation(self, action, f"{name}:{alias}", old=old, new=target, apply=write,
                         actor=actor, notes=notes)

        with self._lock("refs"):
            recover(self, actor=actor)
            if not self.is_bound(name, target):
                raise NotFoundError(f"{target} is not a version of {name}",
                                    fix=f"list versions with `adapters ls {name}`")
            current, _ = cas_ref(self.backend, key, expect, target, conflict, around=audited)
        return current

    def _target_digest(self, name: str, digest: str) -> str:
        if is_digest(digest):
            return digest
        text = str(digest)
        version = self.resolve(text if ("@" in text or ":" in text) and not
                               text.startswith("sha256:") else f"{name}@{text}")
        if version.name != name:
            raise BadInputError(f"{version.ref} is not a version of {name}",
                                fix="aliases can only point at versions of their own name")
        return version.digest

    def delete_alias(self, name: str, alias: str, *, expect: Any = ANY,
                     actor: str | None = None, protected_ok: bool = False) -> str | None:
        """Remove an alias (compare-and-swap like :meth:`set_alias`), audited ``alias``.

        Returns:
            The digest it pointed to, or None if it did not exist.

        Raises:
            GateFailedError: Protected alias without ``protected_ok``.
            ConflictError: ``expect`` does not match.
        """
        validate_name(name)
        validate_alias(alias)
        if alias in self.protected_aliases and not protected_ok:
            raise GateFailedError(f"alias {alias!r} is protected",
                                  fix="protected aliases are moved by `adapters promote`")
        expect = self._expect_digest(name, expect)
        def conflict(current: str | None) -> ConflictError:
            return ConflictError(f"alias {name}:{alias} points to {current or 'nothing'}, "
                                 f"expected {expect or 'nothing'}",
                                 fix=f"re-read the alias and retry with expect={current}")

        def audited(old: str | None, write: Callable[[], None]) -> None:
            run_mutation(self, "alias", f"{name}:{alias}", old=old, new=None, apply=write,
                         actor=actor)

        with self._lock("refs"):
            recover(self, actor=actor)
            current, _ = cas_ref(self.backend, self._alias_key(name, alias), expect,
                                 None, conflict, around=audited)
        return current

    def delete_version(self, ref: str, *, actor: str | None = None) -> Version:
        """Unbind a version from its name (its blobs become garbage for gc), audited.

        Manifests of versions still named as lineage parents are kept by gc.

        Raises:
            ConflictError: An alias still points at it.
            NotFoundError: No such version.
        """
        version = self.resolve(ref)
        with self._lock("refs"):
            recover(self, actor=actor)
            holders = [a for a, d in self.aliases(version.name).items() if d == version.digest]
            if holders:
                raise ConflictError(f"{version.ref} is still the target of alias(es) "
                                    f"{', '.join(holders)}",
                                    fix="move or delete those aliases first")

            def unbind() -> None:
                # claim first: an identical push racing us then re-creates the version cleanly
                release_claim(self.backend, version.name, content_key(version.manifest),
                              version.digest)
                self.backend.delete(self._binding_key(version.name, digest_hex(version.digest)))
            run_mutation(self, "delete", version.ref, old=version.digest, new=None,
                         apply=unbind, actor=actor)
        return version
