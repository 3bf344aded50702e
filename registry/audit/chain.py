"""The hash chain both audit log kinds share: entry shape, hashing, parsing, checking.

Each entry is ``{seq, ts, actor, action, subject, old, new, prev_hash, hash}`` where
``seq`` counts from 1, ``prev_hash`` is the previous entry's ``hash`` (null for the
first) and ``hash`` is the sha256 digest of the canonical JSON of the entry without
its ``hash`` key. The local JSONL log (:mod:`registry.audit.log`) and the one-object-
per-entry log on S3 (:mod:`registry.audit.objects`) store the same entries, so
building and checking them lives here once and both report the same problems.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from registry.digests import json_digest
from registry.errors import IntegrityError
from registry.stamps import default_actor, utc_now_iso
from registry.formats.strict_json import StrictJSONError
from registry.formats.strict_json import loads_strict as loads_json

ENTRY_KEYS = ("seq", "ts", "actor", "action", "subject", "old", "new", "prev_hash", "hash")


def entry_hash(entry: dict[str, Any]) -> str:
    """The digest an entry's ``hash`` field must hold."""
    return json_digest({k: v for k, v in entry.items() if k != "hash"})


@dataclass(frozen=True)
class AuditProblem:
    """One defect found by an audit log's ``verify``.

    Attributes:
        line: 1-based line number in ``log.jsonl`` (0 for ``head.json``).
        kind: ``unparsable``, ``malformed``, ``hash_mismatch``, ``seq_gap``,
            ``seq_order``, ``chain_break``, ``head_mismatch``.
        message: Human-readable explanation.
    """

    line: int
    kind: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"line": self.line, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class AuditReport:
    """Result of verifying the audit log.

    Attributes:
        entries: Number of lines read.
        problems: Every defect found, in line order (head last).
    """

    entries: int
    problems: list[AuditProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON form (``ok``, ``entries``, ``problems``)."""
        return {"ok": self.ok, "entries": self.entries,
                "problems": [p.to_json() for p in self.problems]}


def check_chain(rows: list[tuple[int, bytes]]) -> tuple[list[AuditProblem], int, str | None]:
    """Check a sequence of serialized entries (shared by the local and object audit logs).

    Args:
        rows: ``(position, raw JSON)`` in log order; ``position`` is what problems report
            (a line number locally, the sequence key's number on object storage).

    Returns:
        ``(problems, last seq, last hash)``; the caller checks the head against the last two.
    """
    problems: list[AuditProblem] = []
    prev_seq, prev_hash = 0, None
    for number, raw in rows:
        try:
            entry = loads_json(raw)  # strict: a duplicate key shows one value, hashes another
        except ValueError as err:
            why = f" ({err})" if isinstance(err, StrictJSONError) else ""
            problems.append(AuditProblem(number, "unparsable", f"line is not valid JSON{why}"))
            continue
        if not isinstance(entry, dict) or set(entry) != set(ENTRY_KEYS) \
                or not isinstance(entry.get("seq"), int):
            problems.append(AuditProblem(number, "malformed",
                                         f"entry must have exactly the keys {ENTRY_KEYS}"))
            continue
        seq = entry["seq"]
        if entry["hash"] != entry_hash(entry):
            problems.append(AuditProblem(number, "hash_mismatch",
                                         f"seq {seq}: content does not match its hash "
                                         "(line edited)"))
        if seq <= prev_seq:
            problems.append(AuditProblem(number, "seq_order",
                                         f"seq {seq} after seq {prev_seq} (lines reordered "
                                         "or duplicated)"))
        elif seq != prev_seq + 1:
            problems.append(AuditProblem(number, "seq_gap",
                                         f"seq {seq} follows seq {prev_seq}: "
                                         f"{seq - prev_seq - 1} entr(y/ies) removed"))
        if entry["prev_hash"] != prev_hash:
            problems.append(AuditProblem(number, "chain_break",
                                         f"seq {seq}: prev_hash does not match the previous "
                                         "line's hash"))
        prev_seq, prev_hash = seq, entry["hash"]
    return problems, prev_seq, prev_hash


def new_entry(seq: int, prev_hash: str | None, action: str, subject: str, old: Any, new: Any,
              actor: str | None, ts: str | None = None) -> dict[str, Any]:
    """A complete entry (with its ``hash``) following ``(seq - 1, prev_hash)``."""
    entry: dict[str, Any] = {"seq": seq, "ts": ts or utc_now_iso(),
                             "actor": actor or default_actor(),
                             "action": action, "subject": subject, "old": old, "new": new,
                             "prev_hash": prev_hash}
    entry["hash"] = entry_hash(entry)
    return entry


def parse_entries(rows: Iterable[tuple[int, bytes]], what: str) -> list[dict]:
    """Parse each ``(number, raw JSON)`` row of an audit log into its entry.

    Args:
        rows: Row number and raw bytes, in log order.
        what: What a row is called in the error (``audit log line``, ``audit entry``).

    Raises:
        IntegrityError: A row is not valid JSON, or not an entry (an object with an
            integer ``seq`` and string ``ts``, ``action`` and ``subject``): run
            ``adapters audit verify`` for details.
    """
    out = []
    for number, raw in rows:
        try:
            entry = loads_json(raw)
        except ValueError:
            raise IntegrityError(f"{what} {number} is not valid JSON",
                                 fix="run `adapters audit verify`") from None
        if not _entry_shaped(entry):  # every reader indexes these fields
            raise IntegrityError(f"{what} {number} is not an audit entry",
                                 fix="run `adapters audit verify`")
        out.append(entry)
    return out


def _entry_shaped(entry: object) -> bool:
    return (isinstance(entry, dict) and type(entry.get("seq")) is int
            and all(isinstance(entry.get(key), str) for key in ("ts", "action", "subject")))


def head_seq(head: object) -> int:
    """The ``seq`` of a parsed ``head.json``: a non-negative integer (``true``, ``"2"``,
    ``2.0`` or ``1e999`` is a damaged head, not a number to round).

    Raises:
        TypeError: It is not such an integer (the callers report the head unreadable).
        KeyError: No ``seq``.
    """
    seq = head["seq"] if isinstance(head, dict) else None
    if type(seq) is not int or seq < 0:
        raise TypeError(f"seq must be a non-negative integer, not {seq!r}"[:120])
    return seq
