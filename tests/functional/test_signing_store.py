"""Signatures stored beside versions: CLI round trip, forgeries, trust, gc and verify.

Parametrized over the local and the S3 (moto server on loopback) backends. The CLI
runs in-process through ``cli.main.main``; tampering goes through the backend's own
unconditional ``put`` so that it works the same on both backends.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

import cli.main
from cli import sign_cmds
from registry import signing
from registry.storage.blobs import blob_key
from registry.digests import canonical_json, digest_hex
from registry.errors import BadInputError, GateFailedError
from registry.storage.store import Store
from tests.support.cli import run_json
from tests.support.registry import make_adapter_dir

if "cli.sign_cmds" not in cli.main.COMMAND_MODULES:  # until cli/main.py lists the module
    sign_cmds.register(cli.main.app)


@pytest.fixture()
def signed(store_location: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """A store with two versions of ``demo`` (the newer one signed by key A) and keys A, B."""
    assert run_json(capsys, "init", "--store", store_location)[0] == 0
    digests = []
    for seed in (1, 2):
        adapter = make_adapter_dir(tmp_path / f"a{seed}", seed=seed)
        code, data = run_json(capsys, "push", adapter, "--name", "demo", "--store", store_location)
        assert code == 0, data
        digests.append(data["version"]["digest"])
    keys = {}
    for label in ("a", "b"):
        code, data = run_json(capsys, "keygen", tmp_path / f"{label}.pem",
                              tmp_path / f"{label}.pub")
        assert code == 0, data
        keys[label] = (tmp_path / f"{label}.pem", tmp_path / f"{label}.pub", data["keyid"])
    code, data = run_json(capsys, "sign", f"demo@{digests[1]}", "--key", keys["a"][0],
                          "--store", store_location)
    assert code == 0, data
    assert data["keyid"] == keys["a"][2] and data["digest"] == digests[1]
    return {"store": store_location, "digests": digests, "keys": keys, "envelope": data["envelope"]}


def _verify(capsys: pytest.CaptureFixture[str], s: dict, *args: str | Path) -> tuple[int, dict]:
    return run_json(capsys, "verify", *args, "--signatures", "--trusted-keys", s["keys"]["a"][1],
                    "--store", s["store"])


def test_sign_and_verify_round_trip(signed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = signed["digests"]
    code, data = _verify(capsys, signed, f"demo@{new}")
    assert code == 0 and data["ok"] and data["signed"] == 1
    assert data["blobs"] == 4  # manifest, two files, the envelope
    code, data = _verify(capsys, signed, "--all")
    assert code == 3 and data["signed"] == 1
    assert [(p["kind"], p["digest"]) for p in data["problems"]] == [("unsigned", old)]
    assert data["exit_code"] == 3

    store = Store.open(signed["store"])
    envelopes = store.signatures(new)
    assert len(envelopes) == 1 and envelopes[0]["signatures"][0]["keyid"] == signed["keys"]["a"][2]
    entries = store.audit().entries()
    assert entries[-1]["action"] == "sign" and entries[-1]["subject"] == f"demo@{new}"
    assert entries[-1]["new"] == {"envelope": signed["envelope"], "keyid": signed["keys"]["a"][2]}
    # re-signing with the same key is idempotent (ed25519 is deterministic): not audited again
    code, data = run_json(capsys, "sign", "demo", "--key", signed["keys"]["a"][0],
                          "--store", signed["store"])
    assert code == 0 and data["envelope"] == signed["envelope"]
    assert len(store.audit().entries()) == len(entries) and store.audit().verify().ok

    check = signing.require_signature(store, "demo", [signed["keys"]["a"][1]])
    assert check.ok and check.valid_keyids == (signed["keys"]["a"][2],)
    with pytest.raises(GateFailedError, match="no valid signature from a trusted key"):
        signing.require_signature(store, f"demo@{old}", [signed["keys"]["a"][1]])
    with pytest.raises(BadInputError, match="no trusted public keys"):
        signing.require_signature(store, "demo", [])
    code, data = run_json(capsys, "verify", "--signatures", "--store", signed["store"])
    assert code == 2 and "trusted" in data["message"]


def test_untrusted_key_is_not_enough(signed: dict, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    old, new = signed["digests"]
    _, pub_b, keyid_b = signed["keys"]["b"]
    code, data = run_json(capsys, "sign", f"demo@{old}", "--key", signed["keys"]["b"][0],
                          "--store", signed["store"])
    assert code == 0
    code, data = _verify(capsys, signed, f"demo@{old}")
    assert code == 3 and data["problems"][0]["kind"] == "unsigned"
    assert keyid_b in data["problems"][0]["detail"]
    store = Store.open(signed["store"])
    with pytest.raises(GateFailedError, match="untrusted"):
        signing.require_signature(store, f"demo@{old}", [signed["keys"]["a"][1]])
    # trusting both keys (a directory of public keys) accepts both versions
    trust_dir = tmp_path / "trusted"
    trust_dir.mkdir()
    for label in ("a", "b"):
        (trust_dir / f"{label}.pub").write_bytes(signed["keys"][label][1].read_bytes())
    code, data = run_json(capsys, "verify", "--all", "--signatures", "--trusted-keys", trust_dir,
                          "--store", signed["store"])
    assert code == 0 and data["signed"] == 2


def test_forged_and_edited_envelopes_are_detected(signed: dict,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old, new = signed["digests"]
    store = Store.open(signed["store"])
    priv_a, pub_a, keyid_a = signed["keys"]["a"]
    # 1. a forged envelope: right payload, signature lifted from another version's envelope
    other = signing.sign_version("demo", old, priv_a)
    genuine = store.signatures(new)[0]
    forged = dict(genuine, signatures=[dict(genuine["signatures"][0],
                                            sig=other["signatures"][0]["sig"])])
    store.add_signature(new, forged)  # the store holds no trust list: accepted, then caught
    code, data = _verify(capsys, signed, f"demo@{new}")
    assert code == 3 and [p["kind"] for p in data["problems"]] == ["bad_signature"]
    assert keyid_a in data["problems"][0]["detail"]
    with pytest.raises(GateFailedError, match="does not verify"):
        signing.require_signature(store, new, [pub_a])

    # 2. a valid signature of another version replayed under this one's pointer
    replay_blob = store.put_bytes(canonical_json(other))
    store.backend.put(f"signatures/{digest_hex(new)}/{digest_hex(keyid_a)}",
                      (replay_blob + "\n").encode())
    code, data = _verify(capsys, signed, f"demo@{new}")
    assert code == 3 and data["problems"][0]["kind"] == "bad_signature"

    # 3. the genuine envelope back, then its blob edited in place: verify re-hashes it
    store.add_signature(new, genuine)
    assert _verify(capsys, signed, f"demo@{new}")[0] == 0
    blob = signed["envelope"]
    edited = dict(genuine, payload=base64.b64encode(signing.version_payload("demo", old)).decode())
    store.backend.put(blob_key(blob), canonical_json(edited))
    code, data = run_json(capsys, "verify", "--all", "--store", signed["store"])
    assert code == 3
    assert [(p["kind"], p["digest"]) for p in data["problems"]] == [("corrupt", blob)]
    assert data["problems"][0]["used_by"][0].startswith("signature ")
    code, data = _verify(capsys, signed, f"demo@{new}")
    assert code == 3 and {p["kind"] for p in data["problems"]} == {"corrupt", "bad_signature"}

    with pytest.raises(BadInputError, match="not demo@"):
        store.add_signature(new, other)  # an envelope of another version is refused
    with pytest.raises(BadInputError, match="malformed"):
        store.add_signature(new, {"payloadType": signing.PAYLOAD_TYPE})


def test_gc_keeps_signature_envelopes(signed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store.open(signed["store"])
    orphan = store.put_bytes(b"unreachable")
    code, data = run_json(capsys, "gc", "--grace", "0s", "--store", signed["store"])
    assert code == 0 and orphan in data["removed"] and signed["envelope"] not in data["removed"]
    assert store.blobs.exists(signed["envelope"])
    assert _verify(capsys, signed, f"demo@{signed['digests'][1]}")[0] == 0
    # a deleted version's signature stays (like gate records): history remains checkable
    store.delete_version(f"demo@{signed['digests'][1]}")
    code, _ = run_json(capsys, "gc", "--grace", "0s", "--store", signed["store"])
    assert code == 0 and store.blobs.exists(signed["envelope"])
    assert store.signature_pointers(signed["digests"][1])[0][2] == signed["envelope"]
