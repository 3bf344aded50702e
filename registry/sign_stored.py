"""Signing a stored version: ``adapters sign REF --key KEY.pem`` as one library call.

Resolves the ref, signs the version's name and digest as a DSSE envelope
(:func:`registry.signing.sign_version`) and stores it beside the version
(``Store.add_signature``, audited ``sign``). The CLI only parses and renders the
:class:`SignedVersion`; checking signatures is ``verify --signatures`` and
``promote``'s business (:func:`registry.signing.require_signature`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.storage.store import Store


@dataclass(frozen=True)
class SignedVersion:
    """A signature just stored: the version, the key id and the envelope blob's digest."""

    ref: str
    digest: str
    keyid: str
    envelope: str

    def to_json(self) -> dict[str, Any]:
        """The ``sign --json`` document."""
        return {"ref": self.ref, "digest": self.digest, "keyid": self.keyid,
                "envelope": self.envelope}


def sign_stored_version(store: Store, ref: str, key: Path) -> SignedVersion:
    """Sign the version ``ref`` names with the ed25519 private key ``key`` and store it.

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve; the key is unreadable
            or not an ed25519 private key.
    """
    from registry.signing import sign_version

    version = store.resolve(ref)
    envelope = sign_version(version.name, version.digest, key)
    keyid, blob = next(iter(store.add_signature(version, envelope).items()))
    return SignedVersion(ref=version.ref, digest=version.digest, keyid=keyid, envelope=blob)
