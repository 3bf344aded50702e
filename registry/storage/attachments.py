"""What the store attaches to a version besides its files: gate records and signatures.

Both are a canonical-JSON blob plus a pointer key naming it, written by functions over
:class:`registry.storage.reader.StoreReader` that :class:`registry.storage.store.Store`
exposes as methods. Gate pointers are replaced by compare-and-swap
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
from typing import Any

from registry.audit.journal import recover, run_mutation
from registry.digests import canonical_json, check_digest, is_digest
from registry.errors import BadInputError, ConflictError
from registry.signing import split_envelope
from registry.storage.manifest import Version
from registry.storage.reader import StoreReader
from registry.storage.refwrite import ANY, cas_ref


def put_gate_record(store: StoreReader, candidate: str, policy_digest: str, result: dict, *,
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
    version = store.version_by_digest(candidate) if is_digest(candidate) \
        else store.resolve(candidate)
    check_digest(policy_digest, "policy digest")
    if not isinstance(result, dict):
        raise BadInputError("gate result must be a JSON object", fix="pass a dict")
    data = canonical_json(result)
    with store.lock("gc", shared=True):
        record_digest = store.blobs.put_bytes(data)[0]
        key = store.gate_key(version.digest, policy_digest)
        entry = {"record": record_digest, "policy": policy_digest,
                 "passed": result.get("passed")}

        def audited(old: str | None, write: Callable[[], None]) -> None:
            run_mutation(store, "gate", version.ref, old=old, new=entry, apply=write,
                         actor=actor)

        with store.lock("refs"):
            recover(store, actor=actor)
            cas_ref(store.backend, key, ANY, record_digest,
                    lambda _: ConflictError("unreachable: no expectation"), around=audited)
    return record_digest


def add_signature(store: StoreReader, version: str | Version, envelope: dict[str, Any], *,
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
        version = store.version_by_digest(version) if is_digest(version) \
            else store.resolve(version)
    name, digest, singles = split_envelope(envelope)
    if (name, digest) != (version.name, version.digest):
        raise BadInputError(f"the envelope signs {name}@{digest}, not {version.ref}",
                            fix="sign this version: `adapters sign REF --key KEY.pem`")
    stored: dict[str, str] = {}
    with store.lock("gc", shared=True):
        for keyid, single in singles.items():
            blob = store.blobs.put_bytes(canonical_json(single))[0]
            signed = {"envelope": blob, "keyid": keyid}

            def audited(old: str | None, write: Callable[[], None],
                        signed: dict[str, str] = signed) -> None:
                run_mutation(store, "sign", version.ref, old=old, new=signed, apply=write,
                             actor=actor)

            with store.lock("refs"):
                recover(store, actor=actor)
                cas_ref(store.backend, store.signature_key(digest, keyid), ANY, blob,
                        lambda _: ConflictError("unreachable: no expectation"),
                        around=audited)
            stored[keyid] = blob
    return stored
