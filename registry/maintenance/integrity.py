"""Store integrity: :func:`verify` re-hashes everything a store references.

``verify`` starts from name bindings (one ref or all of them), aliases, gate
records and signatures, re-hashes every blob they reference (manifests, adapter
files, gate records, signature envelopes; each blob once) and reports each missing
or corrupt blob together with every version that uses it. Given trusted keys it
also checks that every selected version carries a valid signature from one of them
(problems ``unsigned`` / ``bad_signature``). It never raises for a damaged store; it
reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from registry.audit.index import AuditIndex, cross_check, missing_from_store
from registry.digests import is_digest
from registry.errors import AdapterkitError, IntegrityError, shorten
from registry.progress import ProgressCallback
from registry.storage.manifest import check_manifest
from registry.storage.store import Store
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass(frozen=True)
class BlobProblem:
    """A problem found by :func:`verify`.

    Attributes:
        kind: ``missing``, ``corrupt``, ``bad_manifest`` (hashes fine but unreadable
            or bound under another name), ``dangling_alias``, ``unaudited`` (a binding,
            alias target, gate record or signature that no effective audit entry
            explains, see :mod:`registry.audit.index`), ``removed`` (one the log records
            that the store no longer holds), and with trusted keys
            ``unsigned`` (no valid signature by a trusted key) or ``bad_signature``
            (a trusted key's signature does not verify: forged, edited or replayed).
        digest: The blob (or alias target) concerned.
        used_by: Who needs it, e.g. ``["lora-a@sha256:ab.. adapter_model.safetensors"]``.
        detail: Extra explanation (actual digest of a corrupt blob...).
    """

    kind: str
    digest: str
    used_by: tuple[str, ...]
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "digest": self.digest, "used_by": list(self.used_by),
                "detail": self.detail}


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        versions: Number of versions checked.
        blobs: Number of distinct blobs re-hashed.
        bytes: Bytes re-hashed.
        problems: Every missing/corrupt blob, one entry per blob.
        signed: Versions with a valid trusted signature (None: signatures not checked).
    """

    versions: int
    blobs: int
    bytes: int
    problems: list[BlobProblem] = field(default_factory=list)
    signed: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is missing or corrupt."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"ok": self.ok, "versions": self.versions, "blobs": self.blobs,
                "bytes": self.bytes, "problems": [p.to_json() for p in self.problems],
                "signed": self.signed}


class _Checker:
    def __init__(self, store: Store, progress: ProgressCallback | None) -> None:
        self.store, self.progress = store, progress
        self.uses: dict[str, list[str]] = {}
        self.results: dict[str, str | None] = {}
        self.bytes = 0
        self.extra: list[BlobProblem] = []

    def use(self, digest: str, who: str) -> None:
        self.uses.setdefault(digest, []).append(who)

    def hash(self, digest: str) -> str | None:
        if digest not in self.results:
            self.results[digest] = self.store.blobs.hash_blob(digest, self.progress)
            if self.results[digest] is not None:
                self.bytes += self.store.blobs.size(digest) or 0
        return self.results[digest]

    def version(self, name: str, digest: str) -> None:
        label = f"{name}@{digest}"
        self.use(digest, f"{label} (manifest)")
        if self.hash(digest) != digest:
            return
        try:
            manifest = check_manifest(loads_json(self.store.blobs.read(digest)), digest)
        except (ValueError, AdapterkitError) as err:
            self.extra.append(BlobProblem("bad_manifest", digest, (label,), str(err)))
            return
        if manifest.get("name") != name:
            self.extra.append(BlobProblem("bad_manifest", digest, (label,),
                                          f"manifest is for {manifest.get('name')!r}"))
        for entry in manifest["files"]:
            self.use(entry["digest"], f"{label} {entry['path']}")


def verify(store: Store, ref: str | None = None, *,
           progress: ProgressCallback | None = None,
           trusted: dict[str, Ed25519PublicKey] | None = None,
           audit_index: AuditIndex | None = None) -> VerifyReport:
    """Re-hash every blob reachable from ``ref`` (None: the whole store), and report what
    the audit log does not explain (``unaudited``; for ``ref``, only what concerns it).

    Args:
        store: The store.
        ref: One version (plus its gate records and signatures, and the aliases that
            point at it), or None for every name, alias, gate record and signature.
        progress: Called with bytes hashed.
        trusted: Key id -> public key (:func:`registry.signing.load_trusted_keys`):
            also require a valid trusted signature on every selected version.
        audit_index: The store's audit index, if a long-running reader keeps one.

    Returns:
        A :class:`VerifyReport` listing each missing or corrupt blob and its users.

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    checker = _Checker(store, progress)
    if ref is not None:
        targets = [store.resolve_digest(ref)]
    else:
        targets = store.bindings()
        for name in store.names():
            for alias, digest in store.aliases(name).items():
                if not store.is_bound(name, digest):
                    checker.extra.append(BlobProblem("dangling_alias", digest,
                                                     (f"{name}:{alias}",),
                                                     "alias points at an unbound version"))
    wanted = {d for _, d in targets}
    for name, digest in targets:
        checker.version(name, digest)
    for cand, policy, record in store.gate_pointers():
        if ref is None or cand in wanted:
            checker.use(record, f"gate record {cand[:19]}../{policy[:19]}..")
    for version_digest, keyid, envelope in store.signature_pointers():
        if ref is None or version_digest in wanted:
            checker.use(envelope, f"signature {version_digest[:19]}.. by {keyid[:19]}..")
    problems = list(checker.extra)
    for digest, users in checker.uses.items():
        actual = checker.hash(digest)
        if actual is None:
            problems.append(BlobProblem("missing", digest, tuple(users), "blob file is absent"))
        elif actual != digest:
            problems.append(BlobProblem("corrupt", digest, tuple(users),
                                        f"content hashes to {actual}"))
    problems += _unaudited(store, targets[0] if ref is not None else None, audit_index)
    signed = None
    if trusted is not None:
        signed, found = _check_signatures(store, targets, trusted)
        problems += found
    problems.sort(key=lambda p: (p.kind, p.digest))
    return VerifyReport(versions=len(targets), blobs=len(checker.results), bytes=checker.bytes,
                        problems=problems, signed=signed)


CROSS_CHECKS = 3
"""Looks at the log and the store before a disagreement is reported (see :func:`_unaudited`)."""


def _unaudited(store: Store, version: tuple[str, str] | None,
               index: AuditIndex | None, *, times: bool = True) -> list[BlobProblem]:
    """Bindings, aliases, gate records and signatures the audit log does not explain, and
    (whole store) what it records that the store lost (``version``: only that version's).

    The log and the store are read at different moments, so a writer working meanwhile
    (a push or delete landing between the two reads, the log's head moving) looks like a
    disagreement. A disagreement is reported only when it is there on every one of
    :data:`CROSS_CHECKS` looks; tampering stays, a race does not.
    """
    persistent: set[BlobProblem] | None = None
    for attempt in range(CROSS_CHECKS):
        try:
            current = index if attempt == 0 and index is not None else AuditIndex.build(store)
            found = cross_check(store, current, version=version, times=times)
            gone = missing_from_store(store, current, version=version)
            seen = {BlobProblem("unaudited", u.digest, (u.key,), u.detail) for u in found} | {
                BlobProblem("removed", u.digest, (u.key,), u.detail) for u in gone}
        except IntegrityError as err:
            seen = {BlobProblem("unaudited", "", ("audit log",), err.message)}
        persistent = seen if persistent is None else persistent & seen
        if not persistent:
            return []
        if attempt < CROSS_CHECKS - 1:
            time.sleep(0.1 * (attempt + 1))
    return sorted(persistent or (), key=lambda p: (p.kind, p.digest, p.used_by))


def refs_disagreements(store: Store) -> list[BlobProblem]:
    """What ``verify --all`` reports as ``unaudited`` or ``removed`` refs (bindings, aliases,
    gate records, signatures, markers), binding times left out, over the same
    :data:`CROSS_CHECKS` looks: a writer working meanwhile (on S3, with no lock) is not
    a disagreement. gc refuses on any (:func:`registry.maintenance.collection.gc`)."""
    return _unaudited(store, None, None, times=False)


def _check_signatures(store: Store, targets: list[tuple[str, str]],
                      trusted: dict[str, Ed25519PublicKey]) -> tuple[int, list[BlobProblem]]:
    """``(versions validly signed, problems)`` for every target binding."""
    from registry.signing import check_version

    signed, problems = 0, []
    for name, digest in targets:  # bindings only: a damaged manifest is reported above
        check = check_version(store, name, digest, trusted)
        label = (f"{name}@{digest}",)
        if check.invalid_keyids:
            problems.append(BlobProblem("bad_signature", digest, label,
                                        "signature by trusted key "
                                        f"{_keyids(check.invalid_keyids)} does not verify"))
        elif not check.valid_keyids:
            others = (f"; signed only by untrusted {_keyids(check.untrusted_keyids)}"
                      if check.untrusted_keyids else "")
            problems.append(BlobProblem("unsigned", digest, label,
                                        f"no valid signature by a trusted key{others}"))
        else:
            signed += 1
    return signed, problems

__all__ = ["BlobProblem", "VerifyReport", "refs_disagreements", "verify"]


def _keyids(keyids: Sequence[str], shown: int = 3) -> str:
    """Key ids for a message: the store's envelopes are untrusted, so a well-formed id
    (``sha256:`` + 64 hex digits) is shown whole, anything else cut to 19 characters, and
    at most ``shown`` are listed."""
    cut = [k if is_digest(k) else shorten(k, 22) for k in keyids[:shown]]
    more = len(keyids) - shown
    return ", ".join(cut) + (f" and {more} more" if more > 0 else "")
