"""Small shared primitives of the registry: canonical JSON, digests, time, atomic writes.

Everything content-addressed in adapterkit hashes the *canonical* JSON form of an
object (sorted keys, no whitespace, UTF-8, no NaN/Infinity), so two processes that
build the same object always get the same digest. Digests are strings
``"sha256:<64 lowercase hex>"`` everywhere.

Durable small-file writes (:func:`atomic_write_bytes`) go through a temp file in
the same directory, ``fsync``, ``os.replace`` and an ``fsync`` of the directory, so
a crash leaves either the old or the new content, never a torn file.

Permissions do not depend on the caller's umask: store files get an explicit mode
(0644, blobs 0444) and every directory the registry creates goes through
:func:`make_dirs`, which creates it with mode 0755 (the umask can only make that
stricter), so even ``umask 000`` never yields a world-writable store.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from registry.errors import BadInputError

DIGEST_PREFIX = "sha256:"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(obj: Any) -> bytes:
    """The canonical byte form of a JSON-able object (what digests are taken over).

    Raises:
        BadInputError: The object is not JSON-able or holds NaN/Infinity.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"value is not canonical JSON: {err}",
                            fix="use only strings, finite numbers, booleans, null, lists and "
                                "objects with string keys") from err
    return text.encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def json_digest(obj: Any) -> str:
    """Digest of the canonical JSON of ``obj``."""
    return sha256_digest(canonical_json(obj))


def is_digest(value: object) -> bool:
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


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> Path:
    """``mkdir -p path``, leaving every directory it creates 0755 or stricter.

    ``Path.mkdir(parents=True)`` makes directories ``0777 & ~umask`` (world-writable
    under ``umask 000``); here each missing component is made with mode 0755, which
    the umask can only make stricter. Existing directories are left alone.

    Returns:
        ``path``.

    Raises:
        OSError: A component cannot be created (or exists as a file).
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            if not directory.is_dir():
                raise
            # a concurrent process made it (with the same mode)
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` durably: temp file in the same dir, fsync, rename.

    Readers see either the old file or the complete new one. The file gets ``mode``
    whatever the umask; missing directories are made by :func:`make_dirs`.

    Raises:
        OSError: The file cannot be written.
    """
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def unlink_quietly(path: str | Path) -> None:
    """Remove a (temp) file, ignoring every ``OSError`` (already gone, no permission)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def read_json_file(path: Path) -> Any:
    """Parse a small JSON file (``FileNotFoundError`` propagates).

    Raises:
        BadInputError: The file is not valid JSON.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise BadInputError(f"{path} is not valid JSON: {err}",
                            fix="restore the file or re-create it") from err
