"""Digests and canonical JSON: how everything content-addressed in adapterkit is named.

Everything content-addressed hashes the *canonical* JSON form of an object (sorted
keys, no whitespace, UTF-8, no NaN/Infinity), so two processes that build the same
object always get the same digest. Digests are strings ``"sha256:<64 lowercase hex>"``
everywhere; the helpers here are the one place that spells that format.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypeGuard

from registry.errors import BadInputError

DIGEST_PREFIX = "sha256:"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
HEX_RE = re.compile(r"^[0-9a-f]{64}\Z")


def canonical_json(obj: Any) -> bytes:
    """The canonical byte form of a JSON-able object (what digests are taken over).

    Raises:
        BadInputError: The object is not JSON-able, holds NaN/Infinity, or a string that
            is not UTF-8 (a lone surrogate).
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"value is not canonical JSON: {err}",
                            fix="use only strings, finite numbers, booleans, null, lists and "
                                "objects with string keys") from err
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: undecodable bytes from a path or argv
        raise BadInputError(f"value is not UTF-8 text (a lone surrogate at offset {err.start})",
                            fix="use UTF-8 names, paths and values") from None


def sha256_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def json_digest(obj: Any) -> str:
    """Digest of the canonical JSON of ``obj``."""
    return sha256_digest(canonical_json(obj))


def is_digest(value: object) -> TypeGuard[str]:
    """True for a full ``sha256:<64 lowercase hex>`` string."""
    return isinstance(value, str) and DIGEST_RE.match(value) is not None


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a full digest.

    Raises:
        BadInputError: It is not ``sha256:`` followed by 64 lowercase hex digits.
    """
    if not is_digest(value):
        raise BadInputError(f"{what} must be 'sha256:' followed by 64 hex digits, got {value!r}",
                            fix="copy the full digest from `adapters ls --json`")
    return str(value)


def digest_hex(digest: str) -> str:
    """``"sha256:<hex>"`` -> ``"<hex>"`` (validated)."""
    return check_digest(digest)[len(DIGEST_PREFIX):]
