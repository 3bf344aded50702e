"""Append-only, hash-chained audit log: ``<store>/audit/log.jsonl`` + ``audit/head.json``.

Each line is one entry ``{seq, ts, actor, action, subject, old, new, prev_hash, hash}``
where ``seq`` counts from 1, ``prev_hash`` is the previous entry's ``hash`` (null for
the first) and ``hash`` is the sha256 digest of the canonical JSON of the entry
without its ``hash`` key. ``head.json`` holds ``{seq, hash}`` of the last entry, so
removing lines at the *end* of the log (which leaves a valid chain) is detected too.

Appends run under ``locks/audit.lock``: find the tail (the last complete line, which
must agree with the head), write the line with ``O_APPEND`` and ``fsync``, then
replace ``head.json`` atomically. A crash or short write mid-line leaves bytes after
the last newline: the writer truncates them itself when it can, and the next append
cuts any that a killed writer left, so a torn line is never glued to a new one. If a
crash falls between the line and the head, the next append adopts the committed
line (valid hash, chained to the head). A tail that disagrees with the head in any
other way (lines edited, removed or reordered) makes :meth:`AuditLog.append` refuse,
so no new entry can paper over tampering.

:meth:`AuditLog.verify` walks the whole file and reports every problem with its
line number: unparsable or malformed lines, hash mismatches (edited lines), seq
gaps and out-of-order seqs (removed or reordered lines), broken ``prev_hash`` links
and a head that disagrees with the last line (truncated or edited tail).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

from registry.audit.chain import (
    AuditProblem,
    AuditReport,
    check_chain,
    entry_hash,
    head_seq,
    new_entry,
    parse_entries,
)
from registry.digests import canonical_json
from registry.errors import IntegrityError
from registry.fsutil import atomic_write_bytes, fsync_dir, make_dirs, open_store_file
from registry.storage.failpoints import armed, failpoint
from registry.storage.locking import file_lock
from registry.formats.strict_json import loads_strict as loads_json

HEAD_READS = 3
"""Reads of the log and its head before a head that disagrees is reported (a concurrent
append can land between the two reads)."""


def _append_line(fd: int, line: bytes) -> None:
    """Write ``line`` at the end of ``fd`` and fsync it, or leave the file as it was.

    Raises:
        OSError: A short write or a failed write/fsync (the file is truncated back).
    """
    size = os.fstat(fd).st_size
    try:
        if armed("audit.torn_line"):
            os.write(fd, line[: len(line) // 2])
            failpoint("audit.torn_line")
        written = os.write(fd, line)
        if written != len(line):  # file size limit or a full disk mid-line
            raise OSError(errno.ENOSPC, f"short write to the audit log ({written} of "
                          f"{len(line)} bytes)")
        os.fsync(fd)
    except BaseException:
        os.ftruncate(fd, size)
        os.fsync(fd)
        raise


def _prev_hash(raw: bytes) -> str | None:
    try:
        entry = loads_json(raw)
    except ValueError:
        return None
    return entry.get("prev_hash") if isinstance(entry, dict) else None


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
            with open_store_file(self.head_path) as handle:
                head = loads_json(handle.read().decode("utf-8"))
            return head_seq(head), head["hash"]
        except FileNotFoundError:
            return 0, None
        except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
            raise IntegrityError(f"audit head {self.head_path} is unreadable: {err}",
                                 fix="run `adapters audit verify`") from err

    def _tail(self) -> tuple[int, str | None]:
        """``(seq, hash)`` to chain onto, after repairing a torn tail (audit lock held).

        The log itself is the truth; ``head.json`` is its checksum. Bytes after the last
        newline are a torn append (a crash or a short write inside :meth:`append`, which
        writes each line with its newline in one call) and are cut off. The last line
        must then be the head's entry, or the entry right after it whose head write
        was lost (adopted: its head is written first). Anything else means the log was edited, truncated or
        reordered, and appending would hide that, so it is refused.

        Raises:
            IntegrityError: The tail disagrees with ``head.json``.
        """
        head_seq, head_hash = self._head()
        last = self._repair_torn_tail()
        if last is None:
            if head_seq == 0:
                return 0, None
            raise IntegrityError(f"audit/head.json names seq {head_seq} but {self.path} "
                                 "has no entries", fix="run `adapters audit verify`")
        seq, digest = last.get("seq"), last.get("hash")
        if (seq, digest) == (head_seq, head_hash):
            return head_seq, head_hash
        if (isinstance(seq, int) and seq == head_seq + 1 and last.get("prev_hash") == head_hash
                and digest == entry_hash(last)):
            # adopt a line whose head write was lost, and write that head now: if it fails
            # again (a disk still full), this append fails before adding a second line past
            # the head, which would read as an edited log for good
            self._write_head(seq, digest)
            return seq, digest
        raise IntegrityError(f"the audit log ends at seq {seq} but audit/head.json says "
                             f"seq {head_seq}; refusing to append to a log that was edited",
                             fix="run `adapters audit verify` and restore the log from a backup")

    def _repair_torn_tail(self) -> dict[str, Any] | None:
        """Cut bytes after the last newline; the last complete entry, or None if empty.

        Raises:
            IntegrityError: The last complete line is not a JSON object.
        """
        try:
            open_store_file(self.path).close()  # a FIFO there would block the open below
            handle = open(self.path, "r+b")
        except FileNotFoundError:
            return None
        with handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))
            handle.seek(start)
            tail = handle.read()
            cut = tail.rfind(b"\n") + 1
            if start + cut < size and (cut > 0 or start == 0):
                handle.truncate(start + cut)  # a torn append: never committed
                handle.flush()
                os.fsync(handle.fileno())
                tail = tail[:cut]
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        if not lines[-1]:
            return None
        try:
            last = loads_json(lines[-1])
        except ValueError:
            last = None
        if not isinstance(last, dict):
            raise IntegrityError(f"the last line of {self.path} is not an audit entry",
                                 fix="run `adapters audit verify`")
        return last

    def append(self, action: str, subject: str, *, old: Any = None, new: Any = None,
               actor: str | None = None, ts: str | None = None) -> dict:
        """Append one entry (locked, fsynced) and return it.

        The line is written with one ``write`` of line + newline; a short write (disk
        full, file size limit) or an error truncates the file back to where it was and
        raises, so no torn line stays behind and ``head.json`` never names one.

        Args:
            action: What happened (``push``, ``alias``, ``promote``, ``gate``, ``gc``...).
            subject: What it happened to (``name@sha256:..``, ``name:alias``...).
            old: The previous value, if any (JSON-able).
            new: The new value, if any (JSON-able).
            actor: Who did it (default ``$ADAPTERS_ACTOR`` or the login name).
            ts: The entry's time (default now; intents pass the time they recorded).

        Raises:
            IntegrityError: ``head.json`` is unreadable or disagrees with the log's tail.
            BadInputError: ``old``/``new`` are not JSON-able.
            OSError: The line or the head could not be written (nothing torn is left;
                a line whose head write failed is adopted by the next append).
        """
        make_dirs(self.dir)
        with file_lock(self.lock_path):
            seq, prev = self._tail()
            entry = new_entry(seq + 1, prev, action, subject, old, new, actor, ts)
            line = canonical_json(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _append_line(fd, line)
            finally:
                os.close(fd)
            fsync_dir(self.dir)
            failpoint("audit.before_head")
            self._write_head(entry["seq"], entry["hash"])
        return entry

    def _write_head(self, seq: int, digest: str) -> None:
        atomic_write_bytes(self.head_path, canonical_json({"seq": seq, "hash": digest}))

    def last_seq(self) -> int:
        """The seq of the last entry ``head.json`` names (0 for an empty log); the log
        may hold one more whose head write was lost.

        Raises:
            IntegrityError: ``head.json`` is unreadable.
        """
        return self._head()[0]

    def entries_after(self, seq: int) -> list[dict]:
        """Entries with a seq above ``seq``, oldest first (unparsable lines skipped)."""
        out = []
        for _, raw in self._lines():
            try:
                entry = loads_json(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("seq"), int) \
                    and entry["seq"] > seq:
                out.append(entry)
        return out

    def entries(self) -> list[dict]:
        """All entries, oldest first.

        Raises:
            IntegrityError: A line is not valid JSON (run :meth:`verify` for details).
        """
        return parse_entries(self._lines(), "audit log line")

    def _lines(self) -> list[tuple[int, bytes]]:
        try:
            with open_store_file(self.path) as handle:
                data = handle.read()
        except FileNotFoundError:
            return []
        # bytes after the last newline are a torn append that was never committed (the
        # next append cuts them); a committed entry always ends with its newline, so a
        # real entry cut short still shows as a head mismatch
        data = data[:data.rfind(b"\n") + 1]
        return [(i + 1, raw) for i, raw in enumerate(data.split(b"\n")) if raw.strip()]

    def verify(self) -> AuditReport:
        """Check the whole chain and the head; never raises for a broken log.

        Returns:
            An :class:`AuditReport`; ``report.ok`` is False if any line was edited,
            removed, reordered or the tail truncated.
        """
        for attempt in range(HEAD_READS):
            lines = self._lines()
            problems, prev_seq, prev_hash = check_chain(lines)
            head = self._check_head(prev_seq, prev_hash, bool(lines),
                                    _prev_hash(lines[-1][1]) if lines else None)
            # a writer appending between reading the lines and the head moves the head past
            # them: that passes on a second look, an edited head or truncated tail does not
            if problems or not head or attempt == HEAD_READS - 1:
                return AuditReport(entries=len(lines), problems=problems + head)
            time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")  # the loop always returns

    def _check_head(self, last_seq: int, last_hash: str | None, any_lines: bool,
                    before_last: str | None) -> list:
        try:
            head_seq, head_hash = self._head()
        except IntegrityError as err:
            return [AuditProblem(0, "head_mismatch", err.message)]
        if not self.head_path.exists():
            if any_lines:
                return [AuditProblem(0, "head_mismatch", "audit/head.json is missing")]
            return []
        if (head_seq, head_hash) == (last_seq - 1, before_last) and head_seq:
            return []  # a crash between the last line and its head write: append adopts it
        if (head_seq, head_hash) != (last_seq, last_hash):
            return [AuditProblem(0, "head_mismatch",
                                 f"head.json says seq {head_seq} but the log ends at seq "
                                 f"{last_seq} (tail truncated or edited)")]
        return []
