"""Binding times against the audit log: ``NAME`` resolves in the order the log records.

A bare ``NAME`` resolves to its newest version by the time written in its binding file
``names/<n>/versions/<hex>`` (the push time; read without any manifest, so ``verify``
works on a store whose manifests are damaged). That file is hashed nowhere: an edited
time silently changed what ``NAME`` meant for export, merge, gate and promote, and
``verify --all`` saw nothing. The log's push entries are hash-chained, so two rules tie
the times to them (:func:`binding_time_problems`, reported by ``verify`` as ``unaudited``):

* a binding's time is within :data:`DRIFT_SECONDS` of its push entry's ``ts`` (both are
  taken by the same push, a moment apart; a push stamps its binding after the name's
  newest one, :func:`registry.stamps.stamp_after`, so a clock stepped back or a skewed
  host moves a time by that much at most);
* ordered as ``NAME`` resolves them (by time, then digest), a name's versions have
  increasing push seqs. On stores without locks (S3) two concurrent pushes of one name
  may take their times and their log places in different orders, so there an
  inversion within :data:`RACE_SECONDS` is not reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from datetime import datetime
from typing import TYPE_CHECKING, Any

from registry.errors import shorten

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader

DRIFT_SECONDS = 3600.0
"""Largest gap accepted between a binding's time and its push entry's ``ts``."""
RACE_SECONDS = 60.0
"""Order inversions this close are a race, not an edit, on stores without locks."""


def seconds(stamp: object) -> float | None:
    """A ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` UTC stamp as POSIX seconds, or None."""
    if not isinstance(stamp, str) or not stamp.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(stamp[:-1] + "+00:00").timestamp()
    except ValueError:
        return None


def binding_time_problems(store: StoreReader, push_entries: dict[str, dict[str, Any]],
                          names: Iterable[str]) -> list[tuple[str, str, str]]:
    """Bindings of ``names`` whose time the audit log contradicts (module docstring), as
    ``(binding key, version digest, what is wrong)``.

    Args:
        store: The store.
        push_entries: ``name@digest`` -> its newest effective push entry (bindings without
            one are reported by :func:`registry.audit.index.cross_check` already).
        names: The names to check.
    """
    slack = 0.0 if store.backend.supports_locks else RACE_SECONDS
    out: list[tuple[str, str, str]] = []
    for name in names:
        rows = []
        for hexdigest in store.bound_hexes(name):
            entry = push_entries.get(f"{name}@sha256:{hexdigest}")
            if entry is None:
                continue
            text = store.binding_time(name, hexdigest)
            when, logged = seconds(text), seconds(entry.get("ts"))
            key = f"names/{name}/versions/{hexdigest}"
            if when is None or logged is None or abs(when - logged) > DRIFT_SECONDS:
                out.append((
                    key, f"sha256:{hexdigest}",
                    f"its binding's time {shorten(text, 40)} is not the time the audit log "
                    f"records for its push ({shorten(entry.get('ts'), 40)}): edited, or a clock hours off?"))
                continue
            rows.append((text, hexdigest, entry.get("seq", -1), when, key))
        rows.sort()  # the order resolve_digest picks the newest by
        for before, after in pairwise(rows):
            if after[2] < before[2] and (slack == 0.0 or after[3] - before[3] > slack):
                out.append((
                    after[4], f"sha256:{after[1]}",
                    f"its binding's time puts it after sha256:{before[1][:12]}.., which the "
                    f"audit log records as pushed later (seq {before[2]} > {after[2]}): "
                    f"`{name}` would resolve to the wrong version (edited?)"))
    return out
