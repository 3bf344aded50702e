"""Who and when: the actor and timestamp every record, binding and audit entry carries.

Timestamps are UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` strings, so they sort
lexicographically in listings and logs; the actor comes from ``$ADAPTERS_ACTOR`` so
CI jobs can name themselves, falling back to the login name.
"""

from __future__ import annotations

import getpass
import os
from datetime import datetime, timezone


def utc_now_iso() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sorts lexicographically)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_actor() -> str:
    """Who is acting: ``$ADAPTERS_ACTOR``, else the login name, else ``"unknown"``."""
    actor = os.environ.get("ADAPTERS_ACTOR", "").strip()
    if actor:
        return actor
    try:
        return getpass.getuser() or "unknown"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
