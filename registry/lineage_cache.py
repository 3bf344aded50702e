"""The child edges and the audit index of a store, kept by a long-running reader between requests.

:func:`registry.lineage.descendants` has to read every bound manifest, since a manifest
names its parents and not its children. That takes about 0.85 s at 10,000 versions, and
grows with the store. The web view serves many requests from one process, so it keeps
the edges in a :class:`LineageCache` and reads them again only when the store may have
changed. The same holds for the :class:`registry.audit.index.AuditIndex` (the whole log,
hash-checked) that its gate verdicts and per-version checks consult: it is kept by the
same rules.

Every mutation runs through the journal (:mod:`registry.audit.journal`): an intent
marker, then the audit entry, then the change, then the marker is removed. Hence:

* Kept edges are reused only while the audit log's last seq is the one they were built
  under. Any audited change (push, delete, gc, a recovery) moves it. On S3 the head
  object can lag its entries, so the entries after it are counted too (:func:`log_tail`).
* Edges are kept only if no intent marker was pending when the build began. With a
  marker pending, the log may already hold an entry whose change (a new binding) is not
  visible yet. Edges kept under that seq would miss the change until the next mutation.
  The seq is read before the markers, so a mutation that completes in between moves
  the seq past the one the edges are kept under, and they are not reused. Any marker
  counts, even one that cannot be parsed. A marker left by a killed writer stays until the
  next write settles it; until then nothing is kept, and every view reads the edges
  afresh, as it did before this cache existed.
* Kept edges expire after ``max_age_s`` in any case. A change made behind the log's back
  (a binding added by hand, which ``verify`` reports as unaudited) shows within that time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from registry.audit.journal import PENDING
from registry.lineage import ChildEdges, child_edges

if TYPE_CHECKING:
    from registry.audit.index import AuditIndex
    from registry.storage.reader import StoreReader

DEFAULT_MAX_AGE_S = 60.0
"""How long kept edges may serve while the audit log does not move."""


def log_tail(store: StoreReader) -> int:
    """The seq of the audit log's last entry.

    A local log's head is written under the store's lock before the change is applied.
    On S3 the head is a hint that a writer may fail to advance
    (:mod:`registry.audit.objects`): the entries after it are counted too (one GET when
    there are none).

    Raises:
        IntegrityError: The head is unreadable.
    """
    log = store.audit()
    seq = log.last_seq()
    if not store.backend.supports_locks:
        seq += len(log.entries_after(seq))
    return seq


@dataclass
class _Kept:
    """One derived view of the store and the seq it was built under."""

    seq: int | None = None
    built_at: float = 0.0
    value: Any = None


@dataclass
class LineageCache:
    """One store's :func:`registry.lineage.child_edges` and :class:`AuditIndex`, each reused
    while the store is unchanged (the rules of the module docstring).

    Safe to share between threads: a build runs outside the lock (two concurrent
    misses may both read the store), and only the newest build is kept.
    """

    max_age_s: float = DEFAULT_MAX_AGE_S
    builds: int = 0
    """How many times the edges were read from the store (tests, diagnostics)."""
    audit_builds: int = 0
    """How many times the audit index was read from the store."""
    _kept: dict[str, _Kept] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def edges(self, store: StoreReader) -> ChildEdges:
        """The store's child edges: kept ones when still valid, else read afresh.

        Raises:
            IntegrityError: The audit head or a bound manifest is unreadable.
        """
        edges: ChildEdges = self._get(store, "edges", child_edges)
        return edges

    def audit_index(self, store: StoreReader) -> AuditIndex:
        """The store's :class:`registry.audit.index.AuditIndex`, kept like the edges (a log
        edited behind the writers' backs, which moves no seq, shows within ``max_age_s``).

        Raises:
            IntegrityError: The log fails its chain check (never kept) or is unreadable.
        """
        from registry.audit.index import AuditIndex

        index: AuditIndex = self._get(store, "audit", AuditIndex.build)
        return index

    def _get(self, store: StoreReader, key: str, build: Callable[[StoreReader], Any]) -> Any:
        seq = log_tail(store)
        now = time.monotonic()
        with self._lock:
            kept = self._kept.get(key)
            if (kept is not None and kept.value is not None and kept.seq == seq
                    and now - kept.built_at < self.max_age_s):
                return kept.value
        # after the seq (see the module docstring); any marker counts, even one that
        # cannot be parsed: it still means a write may be half-way
        settled = not store.backend.list(PENDING)
        value = build(store)
        with self._lock:
            if key == "edges":
                self.builds += 1
            else:
                self.audit_builds += 1
            if settled:
                self._kept[key] = _Kept(seq, now, value)
        return value
