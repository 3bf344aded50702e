"""Blob-level, gate-record and signature operations of the store (split from :mod:`registry.storage.store`).

:class:`StoreFiles` sits between :class:`registry.storage.reader.StoreReader` and
:class:`registry.storage.store.Store`: storing small blobs, opening and materialising stored
files, gate records and signatures. Gate pointers are replaced by compare-and-swap
(:func:`registry.storage.refwrite.cas_ref`), so the audited ``old`` record is exactly the one
replaced even when two machines record gates for the same candidate at once.

Signatures (:mod:`registry.signing`) use the same pattern: each DSSE envelope is a
canonical-JSON blob holding exactly one signature, and the pointer
``signatures/<version hex>/<key id hex>`` names it. Blob first, pointer last, so a
crash leaves at most an unreachable blob; gc keeps pointed-to envelopes and
``verify`` re-hashes them. Re-signing with the same key yields the same envelope
(ed25519 is deterministic), so it changes nothing and is not audited.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from registry.progress import ProgressCallback
from registry.digests import canonical_json
from registry.digests import check_digest
from registry.digests import is_digest
from registry.fsutil import make_dirs
from registry.errors import BadInputError, ConflictError
from registry.audit.journal import recover, run_mutation
from registry.storage.manifest import Version
from registry.storage.refs import validate_file_path
from registry.storage.refwrite import ANY, cas_ref
from registry.signing import split_envelope
from registry.storage.reader import StoreReader

if TYPE_CHECKING:
    from registry.audit.log import AuditLog
    from registry.audit.objects import ObjectAuditLog


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
        make_dirs(dest)
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
            entry = {"record": record_digest, "policy": policy_digest,
                     "passed": result.get("passed")}

            def audited(old: str | None, write: Callable[[], None]) -> None:
                run_mutation(self, "gate", version.ref, old=old, new=entry, apply=write,
                             actor=actor)

            with self._lock("refs"):
                recover(self, actor=actor)
                cas_ref(self.backend, key, ANY, record_digest,
                        lambda _: ConflictError("unreachable: no expectation"), around=audited)
        return record_digest

    def add_signature(self, version: str | Version, envelope: dict[str, Any], *,
                      actor: str | None = None) -> dict[str, str]:
        """Store a DSSE signature envelope beside ``version`` and audit ``sign``.

        The envelope must bind exactly this version's name and digest (see
        :func:`registry.signing.sign_version`); it is not checked against any key here
        (the store holds no trust list: ``verify --signatures`` and
        :func:`registry.signing.require_signature` do that). An envelope with several
        signatures is stored as one single-signature envelope per key.

        Args:
            version: The signed version: a :class:`Version`, a ref or a full digest.
            envelope: The DSSE envelope.
            actor: Who signs (audit).

        Returns:
            ``{key id: envelope blob digest}`` for every signature stored.

        Raises:
            BadInputError: Malformed envelope, or it binds another name or digest.
            NotFoundError: Unknown version.
        """
        if not isinstance(version, Version):
            version = self.version_by_digest(version) if is_digest(version) \
                else self.resolve(version)
        name, digest, singles = split_envelope(envelope)
        if (name, digest) != (version.name, version.digest):
            raise BadInputError(f"the envelope signs {name}@{digest}, not {version.ref}",
                                fix="sign this version: `adapters sign REF --key KEY.pem`")
        stored: dict[str, str] = {}
        with self._lock("gc", shared=True):
            for keyid, single in singles.items():
                blob = self.blobs.put_bytes(canonical_json(single))[0]
                signed = {"envelope": blob, "keyid": keyid}

                def audited(old: str | None, write: Callable[[], None],
                            signed: dict[str, str] = signed) -> None:
                    run_mutation(self, "sign", version.ref, old=old, new=signed, apply=write,
                                 actor=actor)

                with self._lock("refs"):
                    recover(self, actor=actor)
                    cas_ref(self.backend, self._signature_key(digest, keyid), ANY, blob,
                            lambda _: ConflictError("unreachable: no expectation"),
                            around=audited)
                stored[keyid] = blob
        return stored
