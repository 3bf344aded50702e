"""Read side of the store: names, versions, aliases, ref resolution, gate records, signatures.

:class:`registry.storage.store.Store` is this view plus the writers; everything that
only reads (listing, lineage, export, the gate's provenance) takes a ``StoreReader``.
Reading takes no locks: every object it reads is replaced
atomically by writers (rename locally, a single PUT on S3), so a reader sees either
the old or the new state. All access goes through the store's backend
(:mod:`registry.storage.backends`) by key, so the same code reads local and S3 stores.

Manifests are re-hashed each time they are loaded (they are small), so a version
whose manifest blob was altered raises :class:`IntegrityError` instead of being
trusted silently. File blobs are checked when they are materialised or verified.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.digests import DIGEST_PREFIX, HEX_RE, check_digest, digest_hex
from registry.errors import BadInputError, IntegrityError, NotFoundError, shorten
from registry.storage.backends.base import Backend, ObjectMissing
from registry.storage.blobs import BlobStore
from registry.storage.manifest import Version, check_manifest
from registry.storage.refs import (
    MIN_PREFIX,
    SEGMENT_RE,
    is_valid_name,
    parse_ref,
    validate_alias,
    validate_name,
)
from registry.storage.refwrite import read_ref
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.audit.trail import AuditTrail

DEFAULT_CONFIG: dict[str, Any] = {"protected_aliases": ["release"]}
"""What ``config.json`` holds in a new store; keys it lacks fall back to these."""


class StoreReader:
    """Read-only queries over a store.

    The writers (:mod:`registry.storage.publish`, :mod:`registry.storage.aliases`,
    :mod:`registry.storage.attachments`) and the journal work over this view: it gives
    them the keys, the backend, the locks and the audit log, and nothing that writes.

    Args:
        backend: Where the store's objects live.
        blobs: Its blob storage.
        audit: Its audit log (read here; appended to only through the journal).

    Attributes:
        root: A local directory of the store: the store itself for a local store, a
            scratch/cache directory for S3 (``tmp/`` lives there either way).
        location: Where the store is (a path or ``s3://bucket/prefix``).
    """

    def __init__(self, backend: Backend, blobs: BlobStore, audit: AuditTrail) -> None:
        self.backend = backend
        self.blobs = blobs
        self._audit = audit
        self.root: Path = backend.local_root
        self.location: str = backend.location

    def audit(self) -> AuditTrail:
        """The store's audit log (JSONL locally, one object per entry on S3)."""
        return self._audit

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """The store's cross-process lock ``name`` (``gc``, ``refs``; a no-op on S3)."""
        return self.backend.lock(name, shared=shared)

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` merged over the defaults.

        Raises:
            BadInputError: config.json is not valid JSON.
        """
        try:
            data = loads_json(self.backend.get("config.json")[0])
        except ObjectMissing:
            data = {}
        except ValueError as err:
            raise BadInputError(f"{self.location}/config.json is not valid JSON: {err}",
                                fix="restore the file or re-create it") from err
        return {**DEFAULT_CONFIG, **(data if isinstance(data, dict) else {})}

    @property
    def protected_aliases(self) -> list[str]:
        """Aliases only ``promote`` may move: config ``protected_aliases``, a list or one string.

        Raises:
            BadInputError: The setting is neither (a number made alias moves exit 70).
        """
        setting = self.config.get("protected_aliases")
        listed = [setting] if isinstance(setting, str) else [] if setting is None else setting
        if not isinstance(listed, list) or not all(isinstance(a, str) and a for a in listed):
            raise BadInputError(f"{self.location}/config.json protected_aliases must be a list "
                                f"of aliases, got {shorten(setting)}", fix='e.g. ["release"]')
        return list(listed)

    # ---- keys --------------------------------------------------------------------

    def _versions_prefix(self, name: str) -> str:
        return f"names/{validate_name(name)}/versions/"

    def binding_key(self, name: str, hexdigest: str) -> str:
        """The key binding ``name`` to the version ``sha256:<hexdigest>``.

        Raises:
            BadInputError: A malformed name.
        """
        return self._versions_prefix(name) + hexdigest

    def alias_key(self, name: str, alias: str) -> str:
        """The pointer key of ``name:alias``.

        Raises:
            BadInputError: A malformed name or alias.
        """
        return f"names/{validate_name(name)}/aliases/{validate_alias(alias)}"

    def _gate_key(self, candidate: str, policy_digest: str) -> str:
        return f"gates/{digest_hex(candidate)}/{digest_hex(policy_digest)}"

    def _signature_key(self, version_digest: str, keyid: str) -> str:
        return f"signatures/{digest_hex(version_digest)}/{digest_hex(keyid)}"

    def gate_key(self, candidate: str, policy_digest: str) -> str:
        """The pointer key of the gate record of (candidate, policy).

        Raises:
            BadInputError: A malformed digest.
        """
        return self._gate_key(candidate, policy_digest)

    def signature_key(self, version_digest: str, keyid: str) -> str:
        """The pointer key of ``keyid``'s signature on a version.

        Raises:
            BadInputError: A malformed digest.
        """
        return self._signature_key(version_digest, keyid)

    def read_pointer(self, key: str) -> str | None:
        """The digest a pointer object (alias, gate, signature) holds; None if absent or
        not a digest."""
        try:
            return self._read_alias(key)
        except IntegrityError:
            return None

    def _read_ref(self, key: str) -> tuple[str | None, str | None]:
        return read_ref(self.backend, key)

    def _read_alias(self, key: str) -> str | None:
        return self._read_ref(key)[0]

    def _has_versions(self, name: str) -> bool:
        return bool(self.bound_hexes(name))

    def bound_hexes(self, name: str) -> list[str]:
        """The hex digests of every version bound to ``name`` (unordered)."""
        prefix = self._versions_prefix(name)
        return [h for h in (k[len(prefix):] for k in self.backend.list(prefix)) if HEX_RE.match(h)]

    # ---- manifests and versions --------------------------------------------------

    def load_manifest(self, digest: str) -> dict[str, Any]:
        """Read a manifest blob, check its hash and structure.

        Raises:
            IntegrityError: Missing, corrupt or not a manifest.
        """
        data = self.blobs.read_verified(check_digest(digest))
        try:
            manifest = loads_json(data)
        except ValueError:
            raise IntegrityError(f"blob {digest} is not JSON", fix="run `adapters verify`") \
                from None
        return check_manifest(manifest, digest)

    def version_at(self, name: str, hexdigest: str) -> Version:
        """The version of ``name`` bound at ``sha256:<hexdigest>``, manifest checked.

        Raises:
            NotFoundError: No such binding.
            IntegrityError: The manifest is missing, corrupt or of another name.
        """
        try:
            created = self.backend.get(self.binding_key(name, hexdigest))[0].decode(
                "utf-8", errors="replace").strip()
        except ObjectMissing:
            raise NotFoundError(f"{name} has no version sha256:{hexdigest}",
                                fix=f"list versions with `adapters ls {name}`") from None
        digest = DIGEST_PREFIX + hexdigest
        manifest = self.load_manifest(digest)
        if manifest.get("name") != name:
            raise IntegrityError(f"binding {name}@{digest} points at a manifest of "
                                 f"{manifest.get('name')!r}", fix="run `adapters verify`")
        return Version(name, digest, manifest, created)

    def names(self) -> list[str]:
        """Every name with at least one version, sorted."""
        found = set()
        for key in self.backend.list("names/"):
            parts = key.split("/")
            if len(parts) in (4, 5) and parts[-2] == "versions" and HEX_RE.match(parts[-1]):
                found.add("/".join(parts[1:-2]))
        return sorted(n for n in found if is_valid_name(n))

    def versions(self, name: str | None = None) -> list[Version]:
        """Versions of ``name`` (or of every name), newest first.

        Raises:
            NotFoundError: ``name`` has no versions.
            IntegrityError: A manifest is missing or corrupt.
        """
        names = [validate_name(name)] if name is not None else self.names()
        out = [self.version_at(n, h) for n in names for h in self.bound_hexes(n)]
        if name is not None and not out:
            raise NotFoundError(f"no versions named {name!r}", fix="list names with `adapters ls`")
        return sorted(out, key=lambda v: (v.created, v.digest), reverse=True)

    def aliases(self, name: str) -> dict[str, str]:
        """``alias -> digest`` for one name (sorted by alias)."""
        prefix = f"names/{validate_name(name)}/aliases/"
        out = {}
        for key in self.backend.list(prefix):
            alias = key[len(prefix):]
            if SEGMENT_RE.match(alias):
                value = self._read_alias(key)
                if value is not None:
                    out[alias] = value
        return dict(sorted(out.items()))

    def version_by_digest(self, digest: str) -> Version:
        """The version with this full digest, whatever its name.

        Raises:
            NotFoundError: No name binds it.
            BadInputError: Malformed digest.
        """
        check_digest(digest)
        try:
            manifest = self.load_manifest(digest)
        except IntegrityError:
            if not self.blobs.exists(digest):
                raise NotFoundError(f"no version {digest}",
                                    fix="list versions with `adapters ls`") from None
            raise
        return self.version_at(manifest["name"], digest_hex(digest))

    def resolve_digest(self, ref: str) -> tuple[str, str]:
        """``(name, version digest)`` of a ref, from bindings and aliases only.

        Unlike :meth:`resolve` this reads no manifest, so it works on a store whose
        manifests are damaged (``verify`` uses it).

        Raises:
            BadInputError: Malformed ref or ambiguous digest prefix.
            NotFoundError: Unknown name, version or alias.
        """
        parsed = parse_ref(ref)
        if parsed.alias is not None:
            assert parsed.name is not None
            target = self._read_alias(self.alias_key(parsed.name, parsed.alias))
            if target is None:
                raise NotFoundError(f"no alias {parsed.name}:{parsed.alias}",
                                    fix=f"list aliases with `adapters show {parsed.name}`")
            return parsed.name, target
        if parsed.digest_prefix is None:
            assert parsed.name is not None
            latest = None
            for hexdigest in self.bound_hexes(parsed.name):
                created = self.binding_time(parsed.name, hexdigest)
                if latest is None or (created, hexdigest) > latest:
                    latest = (created, hexdigest)
            if latest is None:
                raise NotFoundError(f"no versions named {parsed.name!r}",
                                    fix="list names with `adapters ls`")
            return parsed.name, DIGEST_PREFIX + latest[1]
        prefix = parsed.digest_prefix
        names = [parsed.name] if parsed.name is not None else self.names()
        matches = [(n, h) for n in names for h in self.bound_hexes(n) if h.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"no version matches {ref!r}",
                                fix="list versions with `adapters ls`")
        if len(matches) > 1:
            shown = ", ".join(f"{n}@{h[:12]}" for n, h in matches[:4])
            raise BadInputError(f"ref {ref!r} is ambiguous: {shown}",
                                fix=f"give more hex digits (at least {MIN_PREFIX}, up to 64)")
        return matches[0][0], DIGEST_PREFIX + matches[0][1]

    def binding_time(self, name: str, hexdigest: str) -> str:
        """A binding's push time ('' if none): what ``NAME`` resolves by (checked by
        :mod:`registry.audit.binding_times`)."""
        try:
            return self.backend.get(self.binding_key(name, hexdigest))[0].decode(
                "utf-8", errors="replace").strip()
        except ObjectMissing:
            return ""

    def resolve(self, ref: str) -> Version:
        """Turn a ref into a version (grammar in :mod:`registry.storage.refs`).

        Raises:
            BadInputError: Malformed ref or ambiguous digest prefix.
            NotFoundError: Unknown name, version or alias.
            IntegrityError: The manifest is missing or corrupt.
        """
        name, digest = self.resolve_digest(ref)
        return self.version_at(name, digest_hex(digest))

    # ---- gate records ------------------------------------------------------------

    def gate_record(self, candidate: str, policy_digest: str) -> dict | None:
        """The stored gate result for (candidate digest, policy digest), or None.

        Raises:
            IntegrityError: The record blob is missing or corrupt.
            BadInputError: Malformed digests.
        """
        pointer = self._gate_key(check_digest(candidate, "candidate digest"), policy_digest)
        record_digest = self._read_alias(pointer)
        if record_digest is None:
            return None
        return loads_json(self.blobs.read_verified(record_digest))

    def gate_pointers(self) -> list[tuple[str, str, str]]:
        """Every ``(candidate digest, policy digest, record digest)`` in ``gates/``."""
        return self._pointers("gates/")

    # ---- signatures ---------------------------------------------------------------

    def signature_pointers(self, version_digest: str | None = None) -> list[tuple[str, str, str]]:
        """``(version digest, key id, envelope blob digest)`` in ``signatures/``.

        Args:
            version_digest: Only this version's signatures (None: every version's).

        Raises:
            BadInputError: Malformed ``version_digest``.
        """
        prefix = "signatures/" + (digest_hex(version_digest) + "/" if version_digest else "")
        return self._pointers(prefix)

    def _pointers(self, prefix: str) -> list[tuple[str, str, str]]:
        """``(digest, digest, target digest)`` of each ``<top>/<hex>/<hex>`` pointer under
        ``prefix``; malformed keys and pointers that hold no digest are skipped (verify
        reports a signature pointer without a digest as a missing envelope)."""
        out = []
        for key in self.backend.list(prefix):
            parts = key.split("/")
            if len(parts) != 3 or not HEX_RE.match(parts[1]) or not HEX_RE.match(parts[2]):
                continue
            try:
                value = self._read_alias(key)
            except IntegrityError:
                continue
            if value:
                out.append((DIGEST_PREFIX + parts[1], DIGEST_PREFIX + parts[2], value))
        return out

    def signatures(self, digest: str) -> list[dict[str, Any]]:
        """The DSSE envelopes stored for version ``digest`` (one per signing key).

        Envelopes are returned as stored; whether they verify, and against which
        keys, is :func:`registry.signing.check_version`'s business.

        Raises:
            IntegrityError: An envelope blob is missing, corrupt or not JSON.
            BadInputError: Malformed digest.
        """
        out = []
        for _, _, blob in self.signature_pointers(check_digest(digest)):
            try:
                envelope = loads_json(self.blobs.read_verified(blob))
            except ValueError:
                raise IntegrityError(f"signature envelope {blob} is not JSON",
                                     fix="run `adapters verify --all`; re-sign the version") \
                    from None
            if not isinstance(envelope, dict):
                raise IntegrityError(f"signature envelope {blob} is not a JSON object",
                                     fix="re-sign the version with `adapters sign`")
            out.append(envelope)
        return out

    def is_bound(self, name: str, digest: str) -> bool:
        """Whether ``name`` binds version ``digest``."""
        return self.backend.stat(self.binding_key(name, digest_hex(digest))) is not None

    def bindings(self) -> list[tuple[str, str]]:
        """Every ``(name, version digest)`` binding, without reading manifests."""
        return [(n, DIGEST_PREFIX + h) for n in self.names() for h in self.bound_hexes(n)]
