"""The one interface both audit log kinds implement, so callers never branch on the kind.

A local store keeps its log as ``audit/log.jsonl`` + ``audit/head.json``
(:class:`registry.audit.log.AuditLog`, appends under a flock); an S3 store keeps one
object per entry with a head moved by compare-and-swap
(:class:`registry.audit.objects.ObjectAuditLog`). The store picks one when it opens;
the journal, the index, ``verify`` and the CLI only see :class:`AuditTrail`.
"""

from __future__ import annotations

from typing import Any, Protocol

from registry.audit.chain import AuditReport


class AuditTrail(Protocol):
    """An append-only, hash-chained audit log (entry shape: :mod:`registry.audit.chain`)."""

    def append(self, action: str, subject: str, *, old: Any = None, new: Any = None,
               actor: str | None = None, ts: str | None = None) -> dict:
        """Append one entry after the current last one and return it.

        Raises:
            IntegrityError: The log's tail disagrees with its head (tampering).
            OSError: The entry could not be written (nothing was committed).
        """
        ...

    def last_seq(self) -> int:
        """The sequence number of the last committed entry (0 when empty).

        Raises:
            IntegrityError: The head is unreadable.
        """
        ...

    def entries_after(self, seq: int) -> list[dict]:
        """Entries with a sequence number above ``seq``, in order.

        Raises:
            IntegrityError: An entry is not valid JSON.
        """
        ...

    def entries(self) -> list[dict]:
        """Every entry, in order.

        Raises:
            IntegrityError: An entry is not valid JSON.
        """
        ...

    def verify(self) -> AuditReport:
        """Walk the whole log and report every defect (never raises for a defect)."""
        ...
