"""Append-only, hash-chained audit log: ``<store>/audit/log.jsonl`` + ``audit/head.json``.

Each line is one entry ``{seq, ts, actor, action, subject, old, new, prev_hash, hash}``
where ``seq`` counts from 1, ``prev_hash`` is the previous entry's ``hash`` (null for
the first) and ``hash`` is the sha256 digest of the canonical JSON of the entry
without its ``hash`` key. ``head.json`` holds ``{seq, hash}`` of the last entry, so
removing lines at the *end* of the log (which leaves a valid chain) is detected too.

Appends run under ``locks/audit.lock``: read the head, write the line with
``O_APPEND`` and ``fsync``, then replace ``head.json`` atomically. If a crash falls
between the two writes, the next append notices the committed-but-unheaded line
(valid hash, chained to the head) and adopts it.

:meth:`AuditLog.verify` walks the whole file and reports every problem with its
line number: unparsable or malformed lines, hash mismatches (edited lines), seq
gaps and out-of-order seqs (removed or reordered lines), broken ``prev_hash`` links
and a head that disagrees with the last line (truncated or edited tail).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.common import (atomic_write_bytes, canonical_json, default_actor, fsync_dir,
                             json_digest, make_dirs, utc_now_iso)
from registry.errors import IntegrityError
from registry.locking import file_lock

ENTRY_KEYS = ("seq", "ts", "actor", "action", "subject", "old", "new", "prev_hash", "hash")


def entry_hash(entry: dict[str, Any]) -> str:
    """The digest an entry's ``hash`` field must hold."""
    return json_digest({k: v for k, v in entry.items() if k != "hash"})


@dataclass(frozen=True)
class AuditProblem:
    """One defect found by :meth:`AuditLog.verify`.

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
            entry = json.loads(raw)
        except ValueError:
            problems.append(AuditProblem(number, "unparsable", "line is not valid JSON"))
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
              actor: str | None) -> dict[str, Any]:
    """A complete entry (with its ``hash``) following ``(seq - 1, prev_hash)``."""
    entry: dict[str, Any] = {"seq": seq, "ts": utc_now_iso(), "actor": actor or default_actor(),
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
        IntegrityError: A row is not valid JSON (run ``adapters audit verify`` for details).
    """
    out = []
    for number, raw in rows:
        try:
            out.append(json.loads(raw))
        except ValueError:
            raise IntegrityError(f"{what} {number} is not valid JSON",
                                 fix="run `adapters audit verify`") from None
    return out


class AuditLog:
    """The audit log of one store.

    Args:
        root: The store root (the log lives in ``root/audit``, its lock in ``root/locks``).
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / "audit"
        self.path = self.dir / "log.jsonl"
        self.head_path = self.dir / "head.json"
        self.lock_path = root / "locks" / "audit.lock"

    def _head(self) -> tuple[int, str | None]:
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            return int(head["seq"]), head["hash"]
        except FileNotFoundError:
            return 0, None
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"audit head {self.head_path} is unreadable: {err}",
                                 fix="run `adapters audit verify`") from err

    def _last_line(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 65536))
                tail = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            return json.loads(tail) if tail else None
        except (FileNotFoundError, ValueError):
            return None

    def append(self, action: str, subject: str, *, old: Any = None, new: Any = None,
               actor: str | None = None) -> dict:
        """Append one entry (locked, fsynced) and return it.

        Args:
            action: What happened (``push``, ``alias``, ``promote``, ``gate``, ``gc``...).
            subject: What it happened to (``name@sha256:..``, ``name:alias``...).
            old: The previous value, if any (JSON-able).
            new: The new value, if any (JSON-able).
            actor: Who did it (default ``$ADAPTERS_ACTOR`` or the login name).

        Raises:
            IntegrityError: ``head.json`` is unreadable.
            BadInputError: ``old``/``new`` are not JSON-able.
        """
        make_dirs(self.dir)
        with file_lock(self.lock_path):
            seq, prev = self._head()
            last = self._last_line()
            if (isinstance(last, dict) and last.get("seq") == seq + 1
                    and last.get("prev_hash") == prev and last.get("hash") == entry_hash(last)):
                seq, prev = last["seq"], last["hash"]  # adopt a line whose head write was lost
            entry = new_entry(seq + 1, prev, action, subject, old, new, actor)
            line = canonical_json(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.dir)
            atomic_write_bytes(self.head_path,
                               canonical_json({"seq": entry["seq"], "hash": entry["hash"]}))
        return entry

    def entries(self) -> list[dict]:
        """All entries, oldest first.

        Raises:
            IntegrityError: A line is not valid JSON (run :meth:`verify` for details).
        """
        return parse_entries(self._lines(), "audit log line")

    def _lines(self) -> list[tuple[int, bytes]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [(i + 1, raw) for i, raw in enumerate(data.split(b"\n")) if raw.strip()]

    def verify(self) -> AuditReport:
        """Check the whole chain and the head; never raises for a broken log.

        Returns:
            An :class:`AuditReport`; ``report.ok`` is False if any line was edited,
            removed, reordered or the tail truncated.
        """
        lines = self._lines()
        problems, prev_seq, prev_hash = check_chain(lines)
        problems.extend(self._check_head(prev_seq, prev_hash, bool(lines)))
        return AuditReport(entries=len(lines), problems=problems)

    def _check_head(self, last_seq: int, last_hash: str | None, any_lines: bool) -> list:
        try:
            head_seq, head_hash = self._head()
        except IntegrityError as err:
            return [AuditProblem(0, "head_mismatch", err.message)]
        if not self.head_path.exists():
            if any_lines:
                return [AuditProblem(0, "head_mismatch", "audit/head.json is missing")]
            return []
        if (head_seq, head_hash) != (last_seq, last_hash):
            return [AuditProblem(0, "head_mismatch",
                                 f"head.json says seq {head_seq} but the log ends at seq "
                                 f"{last_seq} (tail truncated or edited)")]
        return []
