"""Who and when: the actor and timestamp every record, binding and audit entry carries.

Timestamps are UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` strings, so they sort
lexicographically in listings and logs; the actor comes from ``$ADAPTERS_ACTOR`` so
CI jobs can name themselves, falling back to the login name.
"""

from __future__ import annotations

import getpass
import os
from datetime import datetime, timedelta, timezone


def utc_now_iso() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sorts lexicographically)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


MAX_AHEAD = timedelta(hours=1)
"""A stamp further ahead of the clock than this was not written by a push (see
:mod:`registry.audit.binding_times`, which allows the same hour)."""


def stamp_after(newest: str) -> str:
    """The current time, or one microsecond after ``newest`` (a stamp of this format) when
    the clock reads no later than that: stamps stay increasing across a clock stepped
    back, a skewed host sharing the store, or two stamps in one microsecond."""
    now = utc_now_iso()
    if not newest or newest < now:
        return now
    try:
        last = datetime.strptime(newest, "%Y-%m-%dT%H:%M:%S.%fZ")
        if last - datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%fZ") > MAX_AHEAD:
            return now  # not a stamp of ours (an edit): verify reports it, do not follow it
        return (last + timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (ValueError, OverflowError):  # not a stamp of ours: the clock is all we have
        return now


def default_actor() -> str:
    """Who is acting: ``$ADAPTERS_ACTOR``, else the login name, else ``"unknown"``."""
    actor = os.environ.get("ADAPTERS_ACTOR", "").strip()
    if actor:
        return actor
    try:
        return getpass.getuser() or "unknown"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
