"""Version manifests and the value types the store hands out.

A version is the sha256 digest of the canonical JSON of its manifest (see
DESIGN.md)::

    {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ...,
     "name": ..., "files": [{"path", "digest", "size"}...] (sorted by path),
     "record": {...}, "lineage": null | {...}}

The manifest is itself stored as a blob, so the version digest is also the
manifest blob's address. :func:`content_key` is the digest of the manifest with
``record.created`` removed: two pushes with equal content keys are the same
version (idempotent re-push).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry.digests import is_digest, json_digest
from registry.errors import IntegrityError
from registry.storage.refs import validate_file_path

SCHEMA_VERSION = 2
MANIFEST_MEDIA_TYPE = "application/vnd.adapterkit.manifest.v1+json"
ADAPTER_ARTIFACT = "application/vnd.adapterkit.adapter.v1"
MODEL_ARTIFACT = "application/vnd.adapterkit.model.v1"
ARTIFACT_TYPES = {ADAPTER_ARTIFACT: "adapter", MODEL_ARTIFACT: "model"}


def build_manifest(name: str, files: list[dict[str, Any]], record: dict[str, Any],
                   lineage: dict[str, Any] | None, artifact_type: str) -> dict[str, Any]:
    """Assemble a manifest (inputs must already be validated)."""
    return {"schemaVersion": SCHEMA_VERSION, "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": artifact_type, "name": name,
            "files": sorted(files, key=lambda f: f["path"]), "record": record,
            "lineage": lineage}


def content_key(manifest: dict[str, Any]) -> str:
    """Digest of the manifest ignoring ``record.created`` (identity for re-push)."""
    record = {k: v for k, v in manifest.get("record", {}).items() if k != "created"}
    return json_digest({**manifest, "record": record})


def check_manifest(manifest: Any, digest: str) -> dict[str, Any]:
    """Light structural check of a manifest read back from the store.

    Raises:
        IntegrityError: The blob is not a manifest this store writes.
    """
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"blob {digest} is not a valid manifest: {why}",
                              fix="run `adapters verify --all`")

    if not isinstance(manifest, dict) or manifest.get("mediaType") != MANIFEST_MEDIA_TYPE:
        raise bad("wrong mediaType")
    if manifest.get("artifactType") not in ARTIFACT_TYPES:
        raise bad(f"unknown artifactType {manifest.get('artifactType')!r}")
    files = manifest.get("files")
    if not isinstance(files, list) or not isinstance(manifest.get("record"), dict):
        raise bad("files/record missing")
    for entry in files:
        if not isinstance(entry, dict) or not is_digest(entry.get("digest")) \
                or not isinstance(entry.get("size"), int):
            raise bad(f"bad file entry {entry!r}")
        validate_file_path(entry.get("path"))
    if manifest.get("lineage") is not None:
        from registry.errors import BadInputError
        from registry.lineage_schema import lineage_shape

        try:  # every lineage reader indexes parents, digests and weights
            lineage_shape(manifest["lineage"])
        except BadInputError as err:
            raise bad(err.message) from None
    return manifest


@dataclass(frozen=True)
class Version:
    """One immutable version of a name.

    Attributes:
        name: The name it is bound to.
        digest: ``sha256:<hex>`` of its manifest.
        manifest: The parsed manifest.
        created: UTC ISO time the name was bound to it (push time).
    """

    name: str
    digest: str
    manifest: dict
    created: str

    @property
    def record(self) -> dict:
        """The adapter (or model) record."""
        return self.manifest["record"]

    @property
    def files(self) -> list[dict]:
        """``[{"path", "digest", "size"}]`` sorted by path (empty for by-reference models)."""
        return self.manifest["files"]

    @property
    def lineage(self) -> dict | None:
        """``{"parents", "recipe", "report"}`` or None."""
        return self.manifest.get("lineage")

    @property
    def artifact_type(self) -> str:
        """The manifest's ``artifactType``."""
        return self.manifest["artifactType"]

    @property
    def kind(self) -> str:
        """``"adapter"`` or ``"model"``."""
        return ARTIFACT_TYPES[self.artifact_type]

    @property
    def ref(self) -> str:
        """``name@sha256:<hex>``, the unambiguous ref of this version."""
        return f"{self.name}@{self.digest}"

    @property
    def short(self) -> str:
        """First 12 hex digits of the digest, for display."""
        return self.digest.split(":", 1)[1][:12]

    @property
    def size(self) -> int:
        """Total bytes of its files."""
        return sum(f["size"] for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """JSON form used by ``show --json``."""
        return {"name": self.name, "digest": self.digest, "ref": self.ref,
                "created": self.created, "kind": self.kind, "artifact_type": self.artifact_type,
                "size": self.size, "files": self.files, "record": self.record,
                "lineage": self.lineage}


@dataclass(frozen=True)
class PushResult:
    """Outcome of :meth:`registry.storage.store.Store.push`.

    Attributes:
        version: The (new or existing) version.
        created: False when an identical version already existed (nothing written).
        new_bytes: Bytes of file blobs actually written (0 when all deduplicated).
    """

    version: Version
    created: bool
    new_bytes: int

    def to_json(self) -> dict[str, Any]:
        """JSON form used by ``push --json``."""
        return {"version": self.version.to_json(), "created": self.created,
                "new_bytes": self.new_bytes}
