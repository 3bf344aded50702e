"""Signed audit checkpoints: an anchor for the audit log kept outside the store.

The audit log is hash-chained (:mod:`registry.audit.log`): editing, removing or
reordering an entry breaks the chain, and ``head.json`` catches a cut tail. What the
chain cannot catch is someone with write access to the store who rewrites the log
*and* recomputes every hash after the change. A checkpoint closes that gap: it is a
DSSE envelope (the format of :mod:`registry.signing`) over ``{"seq", "hash"}`` of
the newest entry, signed with an ed25519 key and kept by the auditor, outside the
store. Because each entry's hash covers the previous entry's hash, a log whose entry
``seq`` still has the signed hash is unchanged up to that entry; one that does not,
or that is shorter, was rewritten or truncated. :func:`check_checkpoint` says which.

Payload type ``application/vnd.adapterkit.audit-checkpoint+json``, so a checkpoint
signature can never pass for a version signature or the other way round.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.digests import canonical_json
from registry.errors import BadInputError, IntegrityError, shorten
from registry.fsutil import read_small_file
from registry.signing import check_signatures, key_id, pae, read_private_key
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.adapterkit.audit-checkpoint+json"


def sign_checkpoint(entries: list[dict[str, Any]], private_key_path: Path) -> dict[str, Any]:
    """A DSSE envelope binding the newest entry's ``seq`` and ``hash``.

    Raises:
        BadInputError: The log is empty, or the key is not a PEM ed25519 private key.
        NotFoundError: The key file does not exist.
    """
    if not entries:
        raise BadInputError("the audit log is empty: there is nothing to checkpoint",
                            fix="checkpoint after the store has recorded something")
    key = read_private_key(private_key_path)
    payload = canonical_json({"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]})
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(key.public_key()),
                            "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode()}]}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file written by ``adapters audit checkpoint``.

    Raises:
        NotFoundError: No such file (exit 5, as a missing key file).
        BadInputError: Not a regular file, too large, or not JSON.
        EnvironmentFailure: Permission denied or an I/O error.
    """
    fix = "pass the file `adapters audit checkpoint --out` wrote"
    data = read_small_file(path, "checkpoint file", fix=fix)
    try:
        return loads_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise BadInputError(f"cannot read checkpoint {shorten(str(path))}: {err}", fix=fix) from None


def check_checkpoint(envelope: Any, entries: list[dict[str, Any]],
                     trusted: dict[str, Ed25519PublicKey]) -> tuple[int, list[str]]:
    """Check ``envelope`` against the log ``entries`` (whose chain the caller verifies).

    Returns:
        ``(seq, problems)``: the checkpointed entry number and what is wrong (empty
        when a trusted key signed it and the log still has that entry with that hash).

    Raises:
        IntegrityError: The envelope is malformed or of another payload type.
    """
    try:
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise IntegrityError(f"checkpoint has payload type {envelope['payloadType']!r}",
                                 fix="pass a file written by `adapters audit checkpoint`")
        payload = base64.b64decode(envelope["payload"], validate=True)
        bound = loads_json(payload)
        seq, digest = bound["seq"], str(bound["hash"])
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"seq {shorten(seq)} is not a non-negative integer")
        signatures = list(envelope["signatures"])
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"malformed audit checkpoint ({str(err)[:200]})",
                             fix="pass a file written by `adapters audit checkpoint`") from None
    problems: list[str] = []
    valid, invalid, untrusted = check_signatures(PAYLOAD_TYPE, payload, signatures, trusted)
    if invalid:
        problems.append(f"checkpoint seq {seq}: signature by {invalid[0][:19]} does not verify "
                        "(the file was altered)")
    elif not valid:
        problems.append(f"checkpoint seq {seq}: not signed by a trusted key "
                        f"(signed by {', '.join(k[:19] for k in untrusted) or 'nobody'})")
    entry = next((e for e in entries if e.get("seq") == seq), None)
    if entry is None:
        problems.append(f"checkpoint seq {seq}: the log has {len(entries)} entries "
                        "(truncated below the checkpoint)")
    elif entry.get("hash") != digest:
        problems.append(f"checkpoint seq {seq}: the entry's hash is {str(entry.get('hash'))[:19]}, "
                        f"the signed one {digest[:19]} (history rewritten up to this entry)")
    return seq, problems
