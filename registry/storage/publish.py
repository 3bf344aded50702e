"""Pushing a version: store the files, write the manifest, bind the name, audited.

The write order is the crash-safety argument (DESIGN.md, "Write protocol"): file blobs
first (temp file, fsync, atomic rename; :mod:`registry.storage.blobs`), then the
manifest blob, then the name binding, created last and only through
:func:`registry.audit.journal.run_mutation`, so a killed push leaves no visible version,
only unreachable blobs that gc reclaims. Identical concurrent pushes converge on one
version: the first claims ``content/<name>/<content key>`` create-only
(:func:`registry.storage.refwrite.claim_content`), the others return that version.

This works over :class:`registry.storage.reader.StoreReader` (keys, backend, locks,
audit log); :class:`registry.storage.store.Store` exposes it as ``Store.push``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from registry.audit.journal import recover, run_mutation
from registry.digests import canonical_json, digest_hex
from registry.errors import AdapterkitError, BadInputError, ConflictError, NotFoundError
from registry.lineage_schema import validate_lineage
from registry.progress import ProgressCallback
from registry.record import validate_record
from registry.stamps import stamp_after
from registry.storage.backends.base import PreconditionFailed
from registry.storage.failpoints import failpoint
from registry.storage.manifest import (
    ADAPTER_ARTIFACT,
    ARTIFACT_TYPES,
    PushResult,
    Version,
    build_manifest,
    content_key,
)
from registry.storage.reader import StoreReader
from registry.storage.refs import validate_file_path, validate_name
from registry.storage.refwrite import claim_content


def push_version(store: StoreReader, name: str, files: Mapping[str, Path], record: dict, *,
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
            store.version_by_digest(parent["digest"])
    check_name_kind(store, name, record["kind"])
    sources = {validate_file_path(path): Path(src) for path, src in files.items()}
    for path, src in sources.items():
        if not src.is_file():
            raise NotFoundError(f"{src} (for {path}) is not a readable file",
                                fix="check the adapter directory")
    with store.lock("gc", shared=True):
        entries, new_bytes = [], 0
        for path in sorted(sources):
            digest, size, written = store.blobs.put_file(sources[path], progress)
            entries.append({"path": path, "digest": digest, "size": size})
            new_bytes += written
        failpoint("push.after_blobs")
        manifest = build_manifest(name, entries, record, lineage, artifact_type)
        key = content_key(manifest)
        with store.lock("refs"):
            recover(store, actor=actor)
            existing = _same_content(store, name, key)
            if existing is not None:
                return PushResult(existing, False, new_bytes)
            digest, _ = store.blobs.put_bytes(canonical_json(manifest))
            winner = claim_content(store.backend, name, key, digest,
                                   lambda d: _holds_content(store, name, d, key),
                                   wait=0 if store.backend.supports_locks else None)
            if winner is not None:  # a concurrent identical push got there first
                return PushResult(store.version_at(name, digest_hex(winner)), False, new_bytes)
            # after the name's newest binding: a bare NAME resolves by these times, and
            # verify checks their order against the log's (registry.audit.binding_times)
            created = stamp_after(max((store.binding_time(name, h) for h in store.bound_hexes(name)),
                                      default=""))
            version = Version(name, digest, manifest, created)
            binding = store.binding_key(name, digest_hex(digest))
            try:
                run_mutation(store, "push", version.ref, old=None, new=digest, actor=actor,
                             apply=lambda: store.backend.put_if_absent(
                                 binding, (created + "\n").encode()))
            except PreconditionFailed:  # a concurrent identical push bound it first
                return PushResult(store.version_at(name, digest_hex(digest)), False, new_bytes)
    return PushResult(version, True, new_bytes)


def _holds_content(store: StoreReader, name: str, digest: str, key: str) -> bool:
    """Whether ``name`` binds ``digest`` and that version's content key is ``key``.

    A content claim is a plain file: one edited by hand to name another bound version
    made ``push`` return that version ("already stored") and move ``--alias`` onto it.
    A claim is honoured only for a version whose manifest really has that content;
    any other is stale and is taken over.
    """
    if not store.is_bound(name, digest):
        return False
    try:
        return content_key(store.version_at(name, digest_hex(digest)).manifest) == key
    except AdapterkitError:  # a damaged version holds no content: the claim is stale
        return False


def _same_content(store: StoreReader, name: str, key: str) -> Version | None:
    for hexdigest in store.bound_hexes(name):
        try:
            version = store.version_at(name, hexdigest)
        except AdapterkitError:  # a damaged old version must not block new pushes
            continue
        if content_key(version.manifest) == key:
            return version
    return None


def check_name_kind(store: StoreReader, name: str, kind: str) -> None:
    """One kind per name: a model pushed under an adapter's name would make ``NAME`` (its
    newest version) a model, and merge, export and push-hub of ``NAME`` would then fail.

    Raises:
        ConflictError: ``name`` already holds versions of another kind.
    """
    held = next(iter(store.bound_hexes(name)), None)
    if held is None:
        return
    other = store.version_at(name, held).kind
    if other != kind:
        raise ConflictError(f"{name} holds {other} versions; a {kind} needs a name of its own",
                            fix=f"pass another --name, e.g. {name}-{kind}")

