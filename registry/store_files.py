"""Blob-level and gate-record operations of the store (split from :mod:`registry.store`).

:class:`StoreFiles` sits between :class:`registry.store_read.StoreReader` and
:class:`registry.store.Store`: storing small blobs, opening and materialising stored
files, and gate records. Gate pointers are replaced by compare-and-swap
(:func:`registry.refwrite.cas_ref`), so the audited ``old`` record is exactly the one
replaced even when two machines record gates for the same candidate at once.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from registry.blobs import ProgressCallback
from registry.common import canonical_json, check_digest, is_digest
from registry.errors import BadInputError, ConflictError
from registry.manifest import Version
from registry.refs import validate_file_path
from registry.refwrite import ANY, cas_ref
from registry.store_read import StoreReader

if TYPE_CHECKING:
    from registry.audit import AuditLog
    from registry.audit_objects import ObjectAuditLog


class StoreFiles(StoreReader):
    """Blobs, materialisation and gate records (see the module docstring)."""

    _audit: "AuditLog | ObjectAuditLog"

    def _lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        return self.backend.lock(name, shared=shared)

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob and return its digest (unreachable until referenced)."""
        with self._lock("gc", shared=True):
            return self.blobs.put_bytes(data)[0]

    def blob_path(self, digest: str) -> Path:
        """Local path of a blob (may not exist); local stores only.

        Raises:
            BadInputError: Malformed digest, or an S3 store (use :meth:`open_blob` or
                :meth:`materialize` there).
        """
        return self.blobs.path(digest)

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
        dest.mkdir(parents=True, exist_ok=True)
        for entry in version.files:
            self.blobs.copy_verified(entry["digest"], dest / validate_file_path(entry["path"]),
                                     progress)
        return dest

    def put_gate_record(self, candidate: str, policy_digest: str, result: dict, *,
                        actor: str | None = None) -> str:
        """Store a gate result for (candidate version, policy) and audit ``gate``.

        Args:
            candidate: Version digest or any ref resolving to it.
            policy_digest: Digest of the gate policy.
            result: JSON-able result; ``result["passed"]`` is what promote checks.

        Returns:
            Digest of the stored gate-record blob.

        Raises:
            NotFoundError: Unknown candidate.
            BadInputError: Bad policy digest or non-JSON result.
        """
        version = self.version_by_digest(candidate) if is_digest(candidate) \
            else self.resolve(candidate)
        check_digest(policy_digest, "policy digest")
        if not isinstance(result, dict):
            raise BadInputError("gate result must be a JSON object", fix="pass a dict")
        data = canonical_json(result)
        with self._lock("gc", shared=True):
            record_digest = self.blobs.put_bytes(data)[0]
            key = self._gate_key(version.digest, policy_digest)
            with self._lock("refs"):
                old, _ = cas_ref(self.backend, key, ANY, record_digest,
                                 lambda _: ConflictError("unreachable: no expectation"))
                self._audit.append("gate", version.ref, old=old,
                                   new={"record": record_digest, "policy": policy_digest,
                                        "passed": result.get("passed")}, actor=actor)
        return record_digest

