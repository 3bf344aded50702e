"""Ed25519 signatures over version digests, as DSSE envelopes.

A signature binds a *name* to a *version digest*: the payload is the canonical
JSON ``{"digest": "sha256:...", "name": "..."}`` and the signature is taken over
DSSE's pre-authentication encoding (PAE) of that payload, so a signature can be
neither replayed for another payload type nor stretched to another version.

Envelope format (https://github.com/secure-systems-lab/dsse):

```json
{"payloadType": "application/vnd.adapterkit.version+json",
 "payload": "<base64 payload>",
 "signatures": [{"keyid": "sha256:<hex of the raw public key>", "sig": "<base64>"}]}
```

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so that
``openssl genpkey -algorithm ed25519`` keys work unchanged. ``cryptography`` is
imported inside the functions: registry commands that do not sign stay fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, IntegrityError, NotFoundError

PAYLOAD_TYPE = "application/vnd.adapterkit.version+json"


@dataclass(frozen=True)
class SignatureCheck:
    """Outcome of checking one envelope against a set of trusted keys.

    Attributes:
        name: Name the envelope binds.
        digest: Version digest the envelope binds.
        valid_keyids: Key ids whose signature verified against a trusted key.
        invalid_keyids: Key ids that are trusted but whose signature did not verify.
        untrusted_keyids: Key ids of signatures by keys outside the trusted set.
    """

    name: str
    digest: str
    valid_keyids: tuple[str, ...]
    invalid_keyids: tuple[str, ...]
    untrusted_keyids: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """At least one trusted signature verified and none failed."""
        return bool(self.valid_keyids) and not self.invalid_keyids


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding of ``payload``."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def version_payload(name: str, digest: str) -> bytes:
    """Canonical JSON payload that a signature over a version commits to."""
    return json.dumps({"digest": digest, "name": name}, sort_keys=True, separators=(",", ":")).encode()


def generate_key(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair as PEM files and return the key id.

    The private key file is created with mode 0600 and never overwritten.

    Raises:
        ConflictError: If either file already exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from registry.errors import ConflictError

    for path in (private_path, public_path):
        if path.exists():
            raise ConflictError(f"{path} already exists", fix="choose another path; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    with open(private_path, "xb", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def key_id(public_key: Any) -> str:
    """``sha256:<hex>`` of the raw 32-byte ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _read_pem(path: Path, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"key file {path} not found", fix="pass the path of a PEM ed25519 key") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:
                # A private key file also identifies its public half.
                key = serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError) as err:
        raise BadInputError(f"{path} is not a PEM ed25519 key ({err})", fix="create one with `adapters keygen`") from None
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):
        raise BadInputError(f"{path} is not an ed25519 key", fix="only ed25519 keys are supported")
    return key


def sign_version(name: str, digest: str, private_key_path: Path) -> dict[str, Any]:
    """Sign ``name`` bound to ``digest`` and return a DSSE envelope.

    Raises:
        NotFoundError: If the key file does not exist.
        BadInputError: If it is not an unencrypted PEM ed25519 private key.
    """
    key = _read_pem(private_key_path, private=True)
    payload = version_payload(name, digest)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Any]:
    """Map key id -> public key for every PEM file (or every ``*.pem``/``*.pub`` in a directory)."""
    keys: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix in {".pem", ".pub"}) if path.is_dir() else [path]
        for file in files:
            public = _read_pem(file, private=False)
            keys[key_id(public)] = public
    return keys


def check_envelope(envelope: dict[str, Any], trusted: dict[str, Any]) -> SignatureCheck:
    """Verify every signature in ``envelope`` against ``trusted`` keys.

    Raises:
        IntegrityError: If the envelope is malformed or of another payload type.
    """
    from cryptography.exceptions import InvalidSignature

    try:
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise IntegrityError(f"signature envelope has payload type {envelope['payloadType']!r}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        bound = json.loads(payload)
        name, digest = str(bound["name"]), str(bound["digest"])
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"malformed signature envelope ({err})", fix="re-sign the version") from None
    valid, invalid, untrusted = [], [], []
    message = pae(PAYLOAD_TYPE, payload)
    for entry in signatures:
        keyid = str(entry.get("keyid", ""))
        public = trusted.get(keyid)
        if public is None:
            untrusted.append(keyid)
            continue
        try:
            public.verify(base64.b64decode(entry["sig"], validate=True), message)
            valid.append(keyid)
        except (InvalidSignature, KeyError, ValueError):
            invalid.append(keyid)
    return SignatureCheck(name, digest, tuple(valid), tuple(invalid), tuple(untrusted))
