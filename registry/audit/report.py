"""The audit log's read-outs and checkpoints as the CLI and the web view show them.

``adapters audit log|verify|checkpoint`` and the web view's ``/api/audit/...`` print
the same documents; building them (which entries, which checkpoint problems, what
the first problem means, what a checkpoint file holds) is library work, so both
callers only render. Documents are plain JSON-able dicts, exactly what ``--json``
prints:

* :func:`newest_entries`: the newest ``limit`` entries (0: all);
* :func:`audit_document`: the hash-chain check of :meth:`registry.audit.log.AuditLog.verify`
  plus, per signed checkpoint file, ``{"file", "seq", "ok"}`` and its problems
  (``{"line": 0, "kind": "checkpoint", "message": "FILE: ..."}``) appended to
  ``problems``; :func:`audit_error` is the IntegrityError naming the first problem;
* :func:`write_checkpoint`: sign the newest entry, write the envelope to a new file
  and audit the signing (``checkpoint`` on subject ``audit``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import ConflictError, IntegrityError
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.store import Store

AUDIT_FIX = "the log was edited, reordered, truncated or rewritten; restore it from a backup"


def newest_entries(store: Store, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` audit entries, oldest first (``limit`` <= 0: every entry).

    Raises:
        IntegrityError: A line of the log does not parse.
    """
    entries = store.audit().entries()
    return entries[-limit:] if limit > 0 else entries


def audit_document(store: Store, checkpoints: Sequence[Path] = (),
                   trusted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``audit verify`` document: the chain check, then each checkpoint's.

    A checkpoint is checked against the entries only when the chain itself verifies
    (against none otherwise: every checkpoint then fails too).

    Args:
        store: The registry.
        checkpoints: Signed checkpoint files (``--checkpoint``).
        trusted: Key id -> public key trusted to sign checkpoints.

    Returns:
        ``{"ok", "entries", "problems"}`` plus ``"checkpoints"`` when any are given.

    Raises:
        BadInputError / IntegrityError: A checkpoint file is unreadable or malformed.
    """
    report = store.audit().verify()
    data = report.to_json()
    if report.entries == 0 and next(iter(store.bindings()), None) is not None:
        # every push is logged first, so versions without a log mean the log was removed
        data["problems"].append({"line": 0, "kind": "missing",
                                 "message": "the log is empty but the store holds versions "
                                            "(log.jsonl and head.json removed?)"})
    if checkpoints:
        from registry.audit.checkpoint import check_checkpoint, read_checkpoint

        entries = store.audit().entries() if report.ok else []
        data["checkpoints"] = []
        for path in checkpoints:
            seq, problems = check_checkpoint(read_checkpoint(path), entries, dict(trusted or {}))
            data["checkpoints"].append({"file": str(path), "seq": seq, "ok": not problems})
            data["problems"] += [{"line": 0, "kind": "checkpoint", "message": f"{path}: {m}"}
                                 for m in problems]
    data["ok"] = not data["problems"]
    return data


def problem_where(problem: Mapping[str, Any]) -> str:
    """``log line N`` for a line of log.jsonl, ``head.json`` for the head (line 0),
    ``checkpoint`` for a signed checkpoint the log no longer matches."""
    if problem.get("kind") == "checkpoint":
        return "checkpoint"
    return f"log line {problem['line']}" if problem["line"] else "head.json"


def audit_error(document: Mapping[str, Any]) -> IntegrityError | None:
    """The error an :func:`audit_document` with problems fails with (exit 3); None if clean."""
    if not document["problems"]:
        return None
    first = document["problems"][0]
    fix = AUDIT_FIX
    if "not signed by a trusted key" in str(first.get("message")):  # the log may be fine
        fix = ("pass the public key that signed the checkpoint (--trusted-keys); if it is the "
               "right one, the checkpoint file was replaced")
    return IntegrityError(f"audit {problem_where(first)}: {first['message']}", fix=fix)


@dataclass(frozen=True)
class Checkpoint:
    """A signed checkpoint just written: the file, the entry it anchors, the key."""

    file: str
    seq: int
    hash: str
    keyid: str

    def to_json(self) -> dict[str, Any]:
        """The ``audit checkpoint --json`` document."""
        return {"file": self.file, "seq": self.seq, "hash": self.hash, "keyid": self.keyid}


def refuse_existing(out: Path) -> None:
    """A checkpoint file is never overwritten (checked before the store is opened).

    Raises:
        ConflictError: ``out`` already exists.
    """
    if out.exists():
        raise ConflictError(f"{out} already exists", fix="pick a new file name per checkpoint")


def write_checkpoint(store: Store, key: Path, out: Path) -> Checkpoint:
    """Sign the log's newest entry with ``key``, write the envelope to ``out`` (a new
    file, kept outside the store by the auditor) and audit the signing.

    Raises:
        ConflictError: ``out`` already exists.
        IntegrityError: The audit log does not verify (nothing is signed).
        BadInputError: The key is unreadable or not an ed25519 private key.
    """
    from registry.audit.checkpoint import sign_checkpoint
    from registry.audit.journal import CHECKPOINT, recover
    from registry.fsutil import atomic_write_bytes
    from registry.digests import canonical_json

    refuse_existing(out)
    with store.lock("refs"):  # a writer like the others: dead writers' intents settled first
        recover(store)
        if not store.audit().verify().ok:
            raise IntegrityError("the audit log does not verify; not signing it",
                                 fix="run `adapters audit verify` and restore the log first")
        envelope = sign_checkpoint(store.audit().entries(), key)
        payload = loads_json(base64.b64decode(envelope["payload"]))
        keyid = envelope["signatures"][0]["keyid"]
        atomic_write_bytes(out, canonical_json(envelope) + b"\n")
        store.audit().append(CHECKPOINT, "audit", new={**payload, "keyid": keyid})
    return Checkpoint(file=str(out), seq=payload["seq"], hash=payload["hash"], keyid=keyid)
