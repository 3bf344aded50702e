"""The audit log on object storage (S3): one object per entry, no locks.

Local stores keep ``audit/log.jsonl`` + ``audit/head.json`` (:mod:`registry.audit.log`). Object
storage has no append and no lock, so here each entry is its own object
``audit/entries/<seq, 12 digits>`` holding the canonical JSON of the same entry shape
``{seq, ts, actor, action, subject, old, new, prev_hash, hash}``.

Appending claims the next sequence number with a *create-only* write of that key
(``If-None-Match: *``): exactly one writer wins ``seq``; a loser reads the winner's entry,
chains onto its hash and tries ``seq + 1``. So the chain stays linear and gap-free with
any number of concurrent writers on any number of machines.

``audit/head.json`` ``{seq, hash}`` is advanced by compare-and-swap after each append
(only forwards). It tells the next appender where the tail is (no full listing) and lets
:meth:`ObjectAuditLog.verify` detect entries deleted from the tail: the head must name
an existing entry with that hash. It may lag the true tail by appends still in
flight (or an appender that died between its two writes), so a tail cut back to no
further than the head goes unnoticed; enable bucket versioning / Object Lock where
that matters.

Unlike the local log, entries are ordered by when they were *appended*, not by when
the audited change happened: two alias moves racing on S3 can be logged in either
order, but each entry's ``old``/``new`` is exactly what its compare-and-swap replaced.
"""

from __future__ import annotations

import re
from typing import Any

from registry.audit.chain import (AuditProblem, AuditReport, check_chain, head_seq, new_entry,
                                  parse_entries)
from registry.digests import canonical_json
from registry.errors import IntegrityError
from registry.storage.backends.base import Backend, ObjectMissing, PreconditionFailed
from registry.storage.failpoints import failpoint
from registry.formats.strict_json import loads_strict as loads_json

ENTRIES = "audit/entries/"
HEAD = "audit/head.json"
_KEY_RE = re.compile(r"^audit/entries/(\d{12})\Z")


def entry_key(seq: int) -> str:
    """The object key of entry ``seq``."""
    return f"{ENTRIES}{seq:012d}"


class ObjectAuditLog:
    """Audit log with one object per entry (same API as :class:`registry.audit.log.AuditLog`).

    Args:
        backend: The store's backend.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._tail: tuple[int, str | None] | None = None  # last (seq, hash) we know of

    def _entry_at(self, seq: int) -> dict[str, Any]:
        data, _ = self.backend.get(entry_key(seq))
        try:
            entry = loads_json(data)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            raise IntegrityError(f"audit entry {seq} is unreadable",
                                 fix="run `adapters audit verify`")
        return entry

    def _read_head(self) -> tuple[tuple[int, str | None] | None, str | None]:
        try:
            data, etag = self.backend.get(HEAD)
        except ObjectMissing:
            return None, None
        try:
            head = loads_json(data)
            return (head_seq(head), head["hash"]), etag
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"audit head {HEAD} is unreadable: {err}",
                                 fix="run `adapters audit verify`") from err

    def _start(self) -> tuple[int, str | None]:
        if self._tail is not None:
            return self._tail
        head, _ = self._read_head()
        if head is not None:
            return head
        keys = self._keys()
        if not keys:
            return 0, None
        seq = keys[-1][0]
        return seq, self._entry_at(seq)["hash"]

    def last_seq(self) -> int:
        """The seq the head (or, without one, the newest entry) names; 0 when empty.

        Raises:
            IntegrityError: The head is unreadable.
        """
        return self._start()[0]

    def entries_after(self, seq: int) -> list[dict]:
        """Entries ``seq + 1``, ``seq + 2``... up to the first missing one, oldest first."""
        out = []
        while True:
            seq += 1
            try:
                out.append(self._entry_at(seq))
            except (ObjectMissing, IntegrityError):
                return out

    def append(self, action: str, subject: str, *, old: Any = None, new: Any = None,
               actor: str | None = None, ts: str | None = None) -> dict:
        """Append one entry, claiming the next seq create-only, and return it.

        Raises:
            IntegrityError: The head or the entry we must chain onto is unreadable.
            BadInputError: ``old``/``new`` are not JSON-able.
        """
        seq, prev = self._start()
        while True:
            entry = new_entry(seq + 1, prev, action, subject, old, new, actor, ts)
            try:
                self.backend.put_if_absent(entry_key(seq + 1), canonical_json(entry))
                break
            except PreconditionFailed:  # someone else holds seq + 1: chain onto it
                seq, prev = seq + 1, self._entry_at(seq + 1)["hash"]
        self._tail = (entry["seq"], entry["hash"])
        failpoint("audit.before_head")
        self._advance_head(entry["seq"], entry["hash"])
        return entry

    def _advance_head(self, seq: int, digest: str) -> None:
        data = canonical_json({"seq": seq, "hash": digest})
        for _ in range(50):  # give up quietly: the head is a hint, entries are the log
            head, etag = self._read_head()
            if head is not None and head[0] >= seq:
                return
            try:
                if etag is None:
                    self.backend.put_if_absent(HEAD, data)
                else:
                    self.backend.put_if_match(HEAD, data, etag)
                return
            except PreconditionFailed:
                continue

    def _keys(self) -> list[tuple[int, str]]:
        out = []
        for key in self.backend.list(ENTRIES):
            match = _KEY_RE.match(key)
            if match:
                out.append((int(match.group(1)), key))
        return sorted(out)

    def _rows(self) -> list[tuple[int, bytes]]:
        rows = []
        for seq, key in self._keys():
            try:
                rows.append((seq, self.backend.get(key)[0]))
            except ObjectMissing:  # deleted between list and get: verify reports the gap
                continue
        return rows

    def entries(self) -> list[dict]:
        """All entries in sequence order.

        Raises:
            IntegrityError: An entry is not valid JSON (run :meth:`verify` for details).
        """
        return parse_entries(self._rows(), "audit entry")

    def verify(self) -> AuditReport:
        """Check the chain and the head; never raises for a broken log.

        Problems report the entry's key number as ``line`` (0 for the head).
        """
        # the head first: a writer puts its entry before moving the head, so a head read
        # before the entries never runs ahead of them, however many writers append meanwhile
        try:
            head: Any = self._read_head()[0]
        except IntegrityError as err:
            head = err
        rows = self._rows()
        problems, last_seq, _ = check_chain(rows)
        problems.extend(self._check_head(rows, last_seq, head))
        return AuditReport(entries=len(rows), problems=problems)

    def _check_head(self, rows: list[tuple[int, bytes]], last_seq: int,
                    head: Any) -> list[AuditProblem]:
        if isinstance(head, IntegrityError):
            return [AuditProblem(0, "head_mismatch", head.message)]
        if head is None:
            return [AuditProblem(0, "head_mismatch", f"{HEAD} is missing")] if rows else []
        by_seq = dict(rows)
        raw = by_seq.get(head[0])
        try:
            found = loads_json(raw).get("hash") if raw is not None else None
        except (ValueError, AttributeError):
            found = None
        if head[0] > last_seq or found != head[1]:
            return [AuditProblem(0, "head_mismatch",
                                 f"head says seq {head[0]} but the log ends at seq {last_seq} "
                                 "or that entry differs (tail truncated or edited)")]
        return []
