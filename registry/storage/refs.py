"""Validation of names, aliases and file paths, and parsing of refs.

Names become directories under ``<store>/names/``, so they are checked before any
path is built from them: each segment matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``,
at most two segments joined by one ``/`` (``org/name``), no ``.``/``..``, no absolute
path, no backslash. The segments ``versions`` and ``aliases`` (the store's own
sub-directories) and the name ``sha256`` (the prefix of bare digests) are reserved.

Ref grammar (:func:`parse_ref`)::

    name                      latest version of name
    name@sha256:<hex>         a version by full digest or unique prefix (>= 6 hex)
    name@<hex>                same, without the algorithm
    name:alias                the version an alias points to
    sha256:<hex>              a version by digest (or unique prefix), any name
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from registry.errors import BadInputError

SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{6,64}\Z")
RESERVED_SEGMENTS = frozenset({"versions", "aliases"})
RESERVED_NAMES = frozenset({"sha256"})
MIN_PREFIX = 6

_NAME_FIX = ("use letters, digits, '.', '_' and '-' (starting with a letter or digit), "
             "optionally 'org/name'")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name.

    Raises:
        BadInputError: Path traversal, absolute path, backslash, bad characters,
            more than one ``/`` or a reserved segment.
    """
    if not isinstance(name, str) or not name:
        raise BadInputError(f"name must be a non-empty string, got {name!r}", fix=_NAME_FIX)
    if "\\" in name or name.startswith("/") or "\x00" in name:
        raise BadInputError(f"invalid name {name!r}: absolute paths and backslashes are refused",
                            fix=_NAME_FIX)
    segments = name.split("/")
    if len(segments) > 2:
        raise BadInputError(f"invalid name {name!r}: at most one '/' (org/name)", fix=_NAME_FIX)
    for segment in segments:
        if segment in (".", "..", ""):
            raise BadInputError(f"invalid name {name!r}: path traversal is refused", fix=_NAME_FIX)
        if not SEGMENT_RE.match(segment):
            raise BadInputError(f"invalid name {name!r}: bad segment {segment!r}", fix=_NAME_FIX)
    if len(segments) == 2 and segments[1] in RESERVED_SEGMENTS:
        raise BadInputError(f"invalid name {name!r}: {segments[1]!r} is reserved",
                            fix="pick another name")
    if name in RESERVED_NAMES:
        raise BadInputError(f"invalid name {name!r}: reserved", fix="pick another name")
    return name



def is_valid_name(name: object) -> bool:
    """Whether ``name`` passes :func:`validate_name` (for listings that skip stray keys)."""
    try:
        validate_name(name)
    except BadInputError:
        return False
    return True

def validate_alias(alias: object) -> str:
    """Return ``alias`` if it is one valid segment (e.g. ``candidate``, ``release``).

    Raises:
        BadInputError: Empty, contains ``/``, ``..`` or characters outside the segment set.
    """
    if not isinstance(alias, str) or not SEGMENT_RE.match(alias):
        raise BadInputError(f"invalid alias {alias!r}",
                            fix="use letters, digits, '.', '_' and '-', e.g. candidate")
    return alias


def validate_file_path(path: object) -> str:
    """Return a file path inside a version if it is relative, normalised and safe.

    Raises:
        BadInputError: Absolute, backslash, ``.``/``..`` components, empty parts.
    """
    fix = "use relative POSIX paths inside the adapter directory, e.g. adapter_config.json"
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        raise BadInputError(f"invalid file path {path!r}", fix=fix)
    if path.startswith("/") or PurePosixPath(path).is_absolute():
        raise BadInputError(f"invalid file path {path!r}: absolute paths are refused", fix=fix)
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadInputError(f"invalid file path {path!r}: path traversal is refused", fix=fix)
    return path


@dataclass(frozen=True)
class ParsedRef:
    """A ref split into its parts (exactly one selector is set, or none for latest).

    Attributes:
        name: The name, or None for a bare digest.
        digest_prefix: Lowercase hex (full or >= 6 chars) when selecting by digest.
        alias: The alias when the ref is ``name:alias``.
    """

    name: str | None
    digest_prefix: str | None = None
    alias: str | None = None


def _hex_selector(text: str, ref: str) -> str:
    hexpart = text[len("sha256:"):] if text.lower().startswith("sha256:") else text
    hexpart = hexpart.lower()
    if not HEX_PREFIX_RE.match(hexpart):
        raise BadInputError(
            f"bad version selector in ref {ref!r}: need at least {MIN_PREFIX} hex digits",
            fix="use name@sha256:<hex>, name@<hex prefix>, name:alias or a bare sha256:<hex>")
    return hexpart


def parse_ref(ref: object) -> ParsedRef:
    """Split a ref string (grammar in the module docstring).

    Raises:
        BadInputError: Malformed ref, invalid name or alias, too-short digest prefix.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise BadInputError(f"empty or invalid ref {ref!r}",
                            fix="use name, name@sha256:<hex>, name:alias or sha256:<hex>")
    ref = ref.strip()
    if ref.lower().startswith("sha256:"):
        return ParsedRef(None, digest_prefix=_hex_selector(ref, ref))
    if "@" in ref:
        name, _, selector = ref.partition("@")
        return ParsedRef(validate_name(name), digest_prefix=_hex_selector(selector, ref))
    if ":" in ref:
        name, _, alias = ref.rpartition(":")
        return ParsedRef(validate_name(name), alias=validate_alias(alias))
    return ParsedRef(validate_name(ref))
