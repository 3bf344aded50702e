"""Signatures: DSSE envelopes verified with cryptography's own ed25519 primitives."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from registry import signing
from registry.errors import BadInputError, ConflictError, IntegrityError

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture()
def keypair(tmp_path: Path) -> tuple[Path, Path, str]:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    keyid = signing.generate_key(private, public)
    return private, public, keyid


def test_envelope_verifies_with_independent_pae(keypair: tuple[Path, Path, str]) -> None:
    private, public, keyid = keypair
    envelope = signing.sign_version("demo", DIGEST, private)
    assert envelope["signatures"][0]["keyid"] == keyid
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    # Recompute DSSE's PAE by hand from the spec and verify with the raw public key.
    payload = base64.b64decode(envelope["payload"])
    assert json.loads(payload) == {"digest": DIGEST, "name": "demo"}
    ptype = envelope["payloadType"].encode()
    message = b"DSSEv1 " + str(len(ptype)).encode() + b" " + ptype + b" " + str(len(payload)).encode() + b" " + payload
    key = serialization.load_pem_public_key(public.read_bytes())
    key.verify(base64.b64decode(envelope["signatures"][0]["sig"]), message)  # raises if wrong
    check = signing.check_envelope(envelope, signing.load_trusted_keys([public]))
    assert check.ok and check.valid_keyids == (keyid,) and (check.name, check.digest) == ("demo", DIGEST)


def test_tampered_payload_and_untrusted_key_fail(keypair: tuple[Path, Path, str], tmp_path: Path) -> None:
    private, public, keyid = keypair
    envelope = signing.sign_version("demo", DIGEST, private)
    forged = dict(envelope, payload=base64.b64encode(signing.version_payload("demo", "sha256:" + "cd" * 32)).decode())
    check = signing.check_envelope(forged, signing.load_trusted_keys([public]))
    assert not check.ok and check.invalid_keyids == (keyid,)
    other = Ed25519PrivateKey.generate().public_key()
    other_path = tmp_path / "other.pub"
    other_path.write_bytes(other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    check = signing.check_envelope(envelope, signing.load_trusted_keys([other_path]))
    assert not check.ok and check.untrusted_keyids == (keyid,)


def test_bad_keys_and_envelopes_are_clear_errors(keypair: tuple[Path, Path, str], tmp_path: Path) -> None:
    private, public, _ = keypair
    with pytest.raises(ConflictError):
        signing.generate_key(private, tmp_path / "x.pub")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(BadInputError, match="not a PEM ed25519 key"):
        signing.sign_version("demo", DIGEST, junk)
    with pytest.raises(IntegrityError, match="malformed"):
        signing.check_envelope({"payloadType": signing.PAYLOAD_TYPE, "payload": "!!", "signatures": []}, {})


def test_keygen_writes_a_pair_or_nothing(tmp_path: Path) -> None:
    # found by a QA pass: `keygen k.pem k.pem` wrote the private key, then failed on the public
    same = tmp_path / "k.pem"
    with pytest.raises(BadInputError, match="same file"):
        signing.generate_key(same, tmp_path / "." / "k.pem")
    assert not same.exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConflictError):
        signing.generate_key(tmp_path / "new.pem", tmp_path / "taken")
    assert not (tmp_path / "new.pem").exists()
    keyid = signing.generate_key(tmp_path / "ok.pem", tmp_path / "ok.pub")
    assert keyid and (tmp_path / "ok.pem").stat().st_mode & 0o777 == 0o600
