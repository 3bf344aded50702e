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

Storage: :meth:`registry.storage.store.Store.add_signature` keeps one single-signature
envelope per (version, key) as a blob pointed to by
``signatures/<version hex>/<key id hex>`` (created or replaced by compare-and-swap,
audited ``sign``). The store holds no trust list: trust is decided at check time by
the caller's key files -- :func:`check_version` aggregates every stored envelope of a
version, :func:`require_signature` is what ``promote`` calls, and
``adapters verify --signatures --trusted-keys ...`` reports unsigned or forged
versions as integrity problems (exit 3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import BadInputError, GateFailedError, IntegrityError, NotFoundError
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from registry.storage.manifest import Version
    from registry.storage.reader import StoreReader

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

    The private key file is created with mode 0600, the public one 0644 (whatever the
    umask); neither is ever overwritten.

    Raises:
        BadInputError: Both paths name the same file.
        ConflictError: If either file already exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from registry.errors import BadInputError, ConflictError
    from registry.fsutil import make_dirs

    if os.path.abspath(private_path) == os.path.abspath(public_path):
        raise BadInputError(f"the private and public key paths are the same file ({private_path})",
                            fix="give two paths, e.g. signing.pem signing.pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConflictError(f"{path} already exists", fix="choose another path; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    make_dirs(private_path.parent)
    make_dirs(public_path.parent)
    # explicit modes (the umask can only make them stricter): 0600 private, 0644 public
    written: list[Path] = []
    try:
        for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            with open(path, "xb", opener=_opener(mode)) as handle:
                written.append(path)
                handle.write(data)
    except BaseException:  # a pair or nothing: never a private key without its public key
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return key_id(key.public_key())


def _opener(mode: int) -> Callable[[str, int], int]:
    """An ``open(opener=)`` that creates the file with ``mode`` (before the umask)."""
    return lambda path, flags: os.open(path, flags, mode)


def key_id(public_key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """The unencrypted PEM ed25519 private key in ``path``.

    Raises:
        NotFoundError: The file does not exist.
        BadInputError: It is not an unencrypted PEM ed25519 private key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _read_pem_key(path, private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"{path} is not an ed25519 key", fix="only ed25519 keys are supported")
    return key


def read_public_key(path: Path) -> Ed25519PublicKey:
    """The PEM ed25519 public key in ``path`` (a private key file also gives its public half).

    Raises:
        NotFoundError: The file does not exist.
        BadInputError: It is not a PEM ed25519 key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _read_pem_key(path, private=False)
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"{path} is not an ed25519 key", fix="only ed25519 keys are supported")
    return key


def _read_pem_key(path: Path, private: bool) -> object:
    from cryptography.hazmat.primitives import serialization

    from registry.fsutil import read_small_file

    data = read_small_file(path, "key file", fix="pass the path of a PEM ed25519 key")
    try:
        if private:
            return serialization.load_pem_private_key(data, password=None)
        try:
            return serialization.load_pem_public_key(data)
        except ValueError:
            # A private key file also identifies its public half.
            return serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError) as err:
        raise BadInputError(f"{path} is not a PEM ed25519 key ({err})", fix="create one with `adapters keygen`") from None


def sign_version(name: str, digest: str, private_key_path: Path) -> dict[str, Any]:
    """Sign ``name`` bound to ``digest`` and return a DSSE envelope.

    Raises:
        NotFoundError: If the key file does not exist.
        BadInputError: If it is not an unencrypted PEM ed25519 private key.
    """
    key = read_private_key(private_key_path)
    payload = version_payload(name, digest)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Map key id -> public key for every PEM file (or every ``*.pem``/``*.pub`` in a directory)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix in {".pem", ".pub"}) if path.is_dir() else [path]
        for file in files:
            public = read_public_key(file)
            keys[key_id(public)] = public
    return keys


def check_envelope(envelope: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> SignatureCheck:
    """Verify every signature in ``envelope`` against ``trusted`` keys.

    Raises:
        IntegrityError: If the envelope is malformed or of another payload type.
    """
    try:
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise IntegrityError(f"signature envelope has payload type {envelope['payloadType']!r}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        bound = loads_json(payload)
        name, digest = str(bound["name"]), str(bound["digest"])
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"malformed signature envelope ({err})", fix="re-sign the version") from None
    valid, invalid, untrusted = check_signatures(PAYLOAD_TYPE, payload, signatures, trusted)
    return SignatureCheck(name, digest, valid, invalid, untrusted)


def check_signatures(payload_type: str, payload: bytes, signatures: list[Any],
                     trusted: dict[str, Ed25519PublicKey]) -> tuple[tuple[str, ...], ...]:
    """``(valid, invalid, untrusted)`` key ids of DSSE ``signatures`` over ``payload``:
    verified by a trusted key, failing under a trusted key, by a key not trusted."""
    from cryptography.exceptions import InvalidSignature

    valid, invalid, untrusted = [], [], []
    message = pae(payload_type, payload)
    for entry in signatures:
        keyid = str(entry.get("keyid", "")) if isinstance(entry, dict) else ""
        public = trusted.get(keyid)
        if public is None:
            untrusted.append(keyid)
            continue
        try:
            public.verify(base64.b64decode(entry["sig"], validate=True), message)
            valid.append(keyid)
        except (InvalidSignature, KeyError, TypeError, ValueError):
            invalid.append(keyid)
    return tuple(valid), tuple(invalid), tuple(untrusted)


def split_envelope(envelope: Any) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """Check an envelope's shape; return ``(name, digest, {key id: single-signature envelope})``.

    Raises:
        BadInputError: Not a DSSE envelope of :data:`PAYLOAD_TYPE`, no signatures, a key
            id that is not ``sha256:<hex>``, or a payload that is not ``{name, digest}``.
    """
    from registry.digests import is_digest

    fix = "sign with `adapters sign REF --key KEY.pem` (or registry.signing.sign_version)"
    try:
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise BadInputError(f"envelope payload type is {envelope['payloadType']!r}, "
                                f"expected {PAYLOAD_TYPE}", fix=fix)
        bound = loads_json(base64.b64decode(envelope["payload"], validate=True))
        name, digest = bound["name"], bound["digest"]
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as err:
        raise BadInputError(f"malformed signature envelope ({err})", fix=fix) from None
    if not isinstance(name, str) or not is_digest(digest):
        raise BadInputError("envelope payload must bind a name and a full digest", fix=fix)
    singles: dict[str, dict[str, Any]] = {}
    for entry in signatures:
        if not isinstance(entry, dict) or not is_digest(entry.get("keyid")) \
                or not isinstance(entry.get("sig"), str):
            raise BadInputError("every envelope signature needs a sha256 keyid and a sig",
                                fix=fix)
        singles[entry["keyid"]] = {"payloadType": PAYLOAD_TYPE, "payload": envelope["payload"],
                                   "signatures": [{"keyid": entry["keyid"], "sig": entry["sig"]}]}
    if not singles:
        raise BadInputError("the envelope holds no signature", fix=fix)
    return name, digest, singles


def check_version(store: StoreReader, name: str, digest: str,
                  trusted: dict[str, Ed25519PublicKey]) -> SignatureCheck:
    """Check every envelope stored for version ``name@digest`` against ``trusted`` keys.

    A trusted key's signature counts as invalid when it does not verify, when its
    envelope binds another name or digest (a replayed signature), or when the
    envelope blob is unreadable (corrupt or malformed); such a key is never also
    counted valid.

    Returns:
        The aggregated :class:`SignatureCheck` (``ok``: at least one trusted signature
        verified and none failed).

    Raises:
        BadInputError: Malformed version digest.
    """
    valid: list[str] = []
    invalid: list[str] = []
    untrusted: list[str] = []
    for _, pointer_keyid, blob in store.signature_pointers(digest):
        try:
            envelope = loads_json(store.blobs.read_verified(blob))
            check = check_envelope(envelope, trusted)
        except (IntegrityError, NotFoundError, ValueError):
            (invalid if pointer_keyid in trusted else untrusted).append(pointer_keyid)
            continue
        if (check.name, check.digest) != (name, digest):
            invalid += check.valid_keyids + check.invalid_keyids
        else:
            valid += check.valid_keyids
            invalid += check.invalid_keyids
        untrusted += check.untrusted_keyids
    bad = set(invalid)
    return SignatureCheck(name, digest,
                          tuple(sorted(set(valid) - bad)), tuple(sorted(bad)),
                          tuple(sorted(set(untrusted))))


def require_signature(store: StoreReader, version: Version | str,
                      trusted_key_paths: Iterable[Path]) -> SignatureCheck:
    """Refuse unless ``version`` carries a valid signature from a trusted key.

    What the gate's ``promote`` calls, when signatures are required, before it moves a
    protected alias (DESIGN.md "Gate records and promotion").

    Args:
        store: The store.
        version: A :class:`Version` or a ref.
        trusted_key_paths: PEM public (or private) key files, or directories of
            ``*.pem``/``*.pub`` files.

    Returns:
        The :class:`SignatureCheck` (``ok`` is True).

    Raises:
        BadInputError: No trusted keys given, or a key file is not an ed25519 PEM key.
        NotFoundError: Unknown ref or key file.
        GateFailedError: No stored signature verifies with a trusted key, or a trusted
            key's signature fails to verify (forged or edited envelope).
    """
    paths = list(trusted_key_paths)
    trusted = load_trusted_keys(paths) if paths else {}
    if not trusted:
        raise BadInputError("no trusted public keys to check signatures against",
                            fix="pass --trusted-keys KEY.pub (a PEM file or a directory of them)")
    target = store.resolve(version) if isinstance(version, str) else version
    check = check_version(store, target.name, target.digest, trusted)
    if check.invalid_keyids:
        raise GateFailedError(
            f"{target.ref} has a signature by trusted key {check.invalid_keyids[0]} that does "
            "not verify (forged or edited envelope)",
            fix=f"run `adapters verify {target.ref} --signatures`, then re-sign with "
                "`adapters sign`")
    if not check.valid_keyids:
        others = ", ".join(k[:19] + ".." for k in check.untrusted_keyids)
        extra = f" (signed only by untrusted key(s) {others})" if others else ""
        raise GateFailedError(f"{target.ref} has no valid signature from a trusted key{extra}",
                              fix=f"sign it: `adapters sign {target.ref} --key KEY.pem` with a "
                                  "key whose public half is trusted")
    return check
