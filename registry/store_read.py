"""Read side of the store: names, versions, aliases, ref resolution, gate records.

Split from :mod:`registry.store` to keep modules small; :class:`registry.store.Store`
inherits everything here. Reading takes no locks: every file it reads is replaced
atomically by writers, so a reader sees either the old or the new state.

Manifests are re-hashed each time they are loaded (they are small), so a version
whose manifest blob was altered raises :class:`IntegrityError` instead of being
trusted silently. File blobs are checked when they are materialised or verified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from registry.blobs import BlobStore
from registry.common import DIGEST_PREFIX, HEX_RE, check_digest, digest_hex, is_digest
from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.manifest import Version, check_manifest
from registry.refs import (MIN_PREFIX, RESERVED_SEGMENTS, SEGMENT_RE, parse_ref, validate_alias,
                           validate_name)


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except BadInputError:
        return False
    return True


class StoreReader:
    """Read-only queries over a store directory.

    Args:
        root: Store root.
        blobs: Its blob storage.
    """

    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.root = root
        self.blobs = blobs

    # ---- paths -------------------------------------------------------------------

    def _name_dir(self, name: str) -> Path:
        return self.root / "names" / validate_name(name)

    def _versions_dir(self, name: str) -> Path:
        return self._name_dir(name) / "versions"

    def _aliases_dir(self, name: str) -> Path:
        return self._name_dir(name) / "aliases"

    def _gate_path(self, candidate: str, policy_digest: str) -> Path:
        return self.root / "gates" / digest_hex(candidate) / digest_hex(policy_digest)

    @staticmethod
    def _read_alias(path: Path) -> str | None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not is_digest(value):
            raise IntegrityError(f"{path} does not hold a digest", fix="run `adapters verify`")
        return value

    def _has_versions(self, name: str) -> bool:
        return bool(self._bound_hexes(name))

    def _bound_hexes(self, name: str) -> list[str]:
        vdir = self._versions_dir(name)
        if not vdir.is_dir():
            return []
        return [e.name for e in os.scandir(vdir) if HEX_RE.match(e.name)]

    # ---- manifests and versions --------------------------------------------------

    def load_manifest(self, digest: str) -> dict[str, Any]:
        """Read a manifest blob, check its hash and structure.

        Raises:
            IntegrityError: Missing, corrupt or not a manifest.
        """
        data = self.blobs.read_verified(check_digest(digest))
        try:
            manifest = json.loads(data)
        except ValueError:
            raise IntegrityError(f"blob {digest} is not JSON", fix="run `adapters verify`") \
                from None
        return check_manifest(manifest, digest)

    def _version(self, name: str, hexdigest: str) -> Version:
        binding = self._versions_dir(name) / hexdigest
        try:
            created = binding.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
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
        base = self.root / "names"
        if not base.is_dir():
            return []
        candidates = []
        for top in os.scandir(base):
            if top.is_dir():
                candidates.append(top.name)
                candidates += [f"{top.name}/{sub.name}" for sub in os.scandir(top.path)
                               if sub.is_dir() and sub.name not in RESERVED_SEGMENTS]
        return sorted(n for n in candidates if _valid_name(n) and self._has_versions(n))

    def versions(self, name: str | None = None) -> list[Version]:
        """Versions of ``name`` (or of every name), newest first.

        Raises:
            NotFoundError: ``name`` has no versions.
            IntegrityError: A manifest is missing or corrupt.
        """
        names = [validate_name(name)] if name is not None else self.names()
        out = [self._version(n, h) for n in names for h in self._bound_hexes(n)]
        if name is not None and not out:
            raise NotFoundError(f"no versions named {name!r}", fix="list names with `adapters ls`")
        return sorted(out, key=lambda v: (v.created, v.digest), reverse=True)

    def aliases(self, name: str) -> dict[str, str]:
        """``alias -> digest`` for one name (sorted by alias)."""
        adir = self._aliases_dir(name)
        if not adir.is_dir():
            return {}
        out = {}
        for entry in sorted(os.scandir(adir), key=lambda e: e.name):
            if SEGMENT_RE.match(entry.name):
                value = self._read_alias(Path(entry.path))
                if value is not None:
                    out[entry.name] = value
        return out

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
        return self._version(manifest["name"], digest_hex(digest))

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
            target = self._read_alias(self._aliases_dir(parsed.name) / validate_alias(parsed.alias))
            if target is None:
                raise NotFoundError(f"no alias {parsed.name}:{parsed.alias}",
                                    fix=f"list aliases with `adapters show {parsed.name}`")
            return parsed.name, target
        if parsed.digest_prefix is None:
            assert parsed.name is not None
            latest = None
            for hexdigest in self._bound_hexes(parsed.name):
                created = self._binding_time(parsed.name, hexdigest)
                if latest is None or (created, hexdigest) > latest:
                    latest = (created, hexdigest)
            if latest is None:
                raise NotFoundError(f"no versions named {parsed.name!r}",
                                    fix="list names with `adapters ls`")
            return parsed.name, DIGEST_PREFIX + latest[1]
        prefix = parsed.digest_prefix
        names = [parsed.name] if parsed.name is not None else self.names()
        matches = [(n, h) for n in names for h in self._bound_hexes(n) if h.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"no version matches {ref!r}",
                                fix="list versions with `adapters ls`")
        if len(matches) > 1:
            shown = ", ".join(f"{n}@{h[:12]}" for n, h in matches[:4])
            raise BadInputError(f"ref {ref!r} is ambiguous: {shown}",
                                fix=f"give more hex digits (at least {MIN_PREFIX}, up to 64)")
        return matches[0][0], DIGEST_PREFIX + matches[0][1]

    def _binding_time(self, name: str, hexdigest: str) -> str:
        try:
            return (self._versions_dir(name) / hexdigest).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    def resolve(self, ref: str) -> Version:
        """Turn a ref into a version (grammar in :mod:`registry.refs`).

        Raises:
            BadInputError: Malformed ref or ambiguous digest prefix.
            NotFoundError: Unknown name, version or alias.
            IntegrityError: The manifest is missing or corrupt.
        """
        name, digest = self.resolve_digest(ref)
        return self._version(name, digest_hex(digest))

    # ---- gate records ------------------------------------------------------------

    def gate_record(self, candidate: str, policy_digest: str) -> dict | None:
        """The stored gate result for (candidate digest, policy digest), or None.

        Raises:
            IntegrityError: The record blob is missing or corrupt.
            BadInputError: Malformed digests.
        """
        pointer = self._gate_path(check_digest(candidate, "candidate digest"), policy_digest)
        record_digest = self._read_alias(pointer)
        if record_digest is None:
            return None
        return json.loads(self.blobs.read_verified(record_digest))

    def gate_pointers(self) -> list[tuple[str, str, str]]:
        """Every ``(candidate digest, policy digest, record digest)`` in ``gates/``."""
        out = []
        base = self.root / "gates"
        if not base.is_dir():
            return out
        for cand in sorted(os.scandir(base), key=lambda e: e.name):
            if not cand.is_dir() or len(cand.name) != 64:
                continue
            for pol in sorted(os.scandir(cand.path), key=lambda e: e.name):
                if len(pol.name) == 64:
                    try:
                        value = self._read_alias(Path(pol.path))
                    except IntegrityError:
                        continue
                    if value:
                        out.append((DIGEST_PREFIX + cand.name, DIGEST_PREFIX + pol.name, value))
        return out

    def is_bound(self, name: str, digest: str) -> bool:
        """Whether ``name`` binds version ``digest``."""
        return (self._versions_dir(name) / digest_hex(digest)).is_file()

    def bindings(self) -> list[tuple[str, str]]:
        """Every ``(name, version digest)`` binding, without reading manifests."""
        return [(n, DIGEST_PREFIX + h) for n in self.names() for h in self._bound_hexes(n)]
