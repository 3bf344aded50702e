"""Strict JSON parsing for untrusted files: no duplicate keys, no NaN/Infinity.

Python's ``json`` keeps the *last* of two equal keys and accepts ``NaN``/``Infinity``;
other readers (safetensors in Rust, PEFT, the Hub) may keep the first or refuse the
file, so two tools would see two different documents. Every untrusted JSON document the
registry reads -- a safetensors header, ``adapter_config.json``, ``config.json``, a
shard index -- goes through :func:`loads_strict`, which refuses both. Callers add
their own limits (size caps, integer ranges through ``parse_int``) and word the
failure for their file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry.errors import BadInputError

_CONTROL = re.compile("[\x00-\x1f\x7f]")
MAX_JSON_BYTES = 64 * 1024 * 1024
"""Default size cap of :func:`load_json_file` (bounds memory on hostile input)."""
SHOWN_CHARS = 80
"""How much of an untrusted key or name a message quotes."""


class StrictJSONError(ValueError):
    """A document that ``json`` would accept but strict parsing refuses (message says why)."""


def show_name(name: str) -> str:
    """An untrusted key or name made safe for a one-line message (quoted, cut, escaped)."""
    cut = name[:SHOWN_CHARS]
    text = cut.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return repr(text + ("..." if len(name) > SHOWN_CHARS else ""))


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # only then look for the culprit: the common case stays fast
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"duplicate key {show_name(key)}")
            seen.add(key)
    return out


def _no_constant(text: str) -> Any:
    raise StrictJSONError(f"unexpected constant {text}")


class JSONNestingError(ValueError):
    """A document nested deeper than Python's parser can follow (a ``RecursionError`` there)."""


def loads_json(data: str | bytes) -> Any:
    """``json.loads`` for untrusted bytes, with a document nested too deeply for the parser
    (``[[[[...`` 100 000 levels: a ``RecursionError`` inside ``json``) raised as
    :class:`JSONNestingError`, a ``ValueError`` like every other malformed document, so
    callers that report bad JSON as tampering (exit 3) or bad input (exit 2) report it too.

    Raises:
        ValueError: Not JSON (``json.JSONDecodeError``) or nested too deeply.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise JSONNestingError("JSON nested too deeply") from None


def loads_strict(text: str | bytes, *, parse_int: Callable[[str], Any] | None = None,
                 parse_float: Callable[[str], Any] | None = None) -> Any:
    """``json.loads`` refusing duplicate keys and ``NaN``/``Infinity``/``-Infinity``.

    Args:
        text: The document.
        parse_int: Optional hook for integer literals (e.g. a range check), as in ``json``.
        parse_float: Optional hook for float literals, as in ``json``.

    Raises:
        StrictJSONError: A duplicate key or a non-finite constant.
        ValueError: Not JSON at all (``json.JSONDecodeError``), or what a hook raises.
        JSONNestingError: Nested too deeply.
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_int=parse_int,
                          parse_float=parse_float, parse_constant=_no_constant)
    except RecursionError:
        raise JSONNestingError("JSON nested too deeply") from None


def load_json_file(path: Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a small JSON file strictly (size cap, no NaN, no duplicate keys).

    Args:
        path: The file.
        what: How messages call it (``"config.json"``).
        max_bytes: Refuse larger files (bounds memory on hostile input).

    Raises:
        BadInputError: too big, not UTF-8, not JSON, or unreadable.
    """
    fix = f"repair or regenerate {path.name}"
    try:
        if not path.is_file():
            raise BadInputError(f"{path}: {what} is not a regular file", fix=fix)
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise BadInputError(f"{path}: {what} is larger than {max_bytes} bytes", fix=fix)
    except OSError as exc:
        problem = exc.strerror or exc
        raise BadInputError(f"{path}: cannot read {what} ({problem})", fix=fix) from None

    try:
        return loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: {what} is not UTF-8", fix=fix) from None
    except RecursionError:
        raise BadInputError(f"{path}: {what} is nested too deeply", fix=fix) from None
    except ValueError as exc:
        problem = str(exc)[:100]
        raise BadInputError(f"{path}: {what} is not valid JSON ({problem})", fix=fix) from None

