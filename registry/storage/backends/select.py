"""Choose a backend from a store location: ``s3://bucket/prefix`` or a local directory.

Kept apart from :mod:`registry.storage.backends.base` (the contract), because it must
know both implementations while they import the contract: one module per direction,
no cycle. ``s3://bucket/prefix`` (also ``s3:/bucket/prefix``, which is what
``pathlib.Path`` makes of it) selects :class:`registry.storage.backends.s3.S3Backend`
-- boto3 is imported only then -- anything else is a local directory
(:class:`registry.storage.backends.local.LocalBackend`).
"""

from __future__ import annotations

import re
from pathlib import Path

from registry.errors import BadInputError, shorten
from registry.storage.backends.base import Backend


def s3_location(root: object) -> tuple[str, str] | None:
    """``(bucket, prefix)`` when ``root`` names an S3 store, else None.

    Accepts ``s3://bucket/prefix`` and the ``s3:/bucket/prefix`` that ``Path`` makes of it.
    """
    text = str(root)
    if text.rstrip("/") == "s3:" or text.startswith("s3:///"):  # `s3://` alone (Path folds
        return "", ""  # it to `s3:`) or an empty bucket before the prefix: no bucket
    for scheme in ("s3://", "s3:/"):
        if text.startswith(scheme):
            rest = text[len(scheme):].strip("/")
            bucket, _, prefix = rest.partition("/")
            return bucket, prefix.strip("/")
    return None


def open_backend(root: str | Path) -> Backend:
    """The backend for a store location (``s3://bucket/prefix`` or a directory).

    Raises:
        BadInputError: Malformed S3 location, or boto3 is not installed.
    """
    where = s3_location(root)
    if where is not None:
        if not BUCKET.match(where[0]):  # botocore's own rule; its error is a long regex dump
            what = f"{shorten(where[0])} is not a valid S3 bucket name" if where[0] else "no bucket"
            raise BadInputError(f"S3 store location {shorten(str(root))}: {what}",
                                fix="use s3://bucket/prefix")
        from registry.storage.backends.s3 import S3Backend  # boto3 only when S3 is used
        return S3Backend(*where)
    check_not_url(root)
    from registry.storage.backends.local import LocalBackend
    return LocalBackend(Path(root).expanduser())


def check_not_url(root: object) -> None:
    """Refuse a URL-like location other than ``s3://`` (``S3://``, ``gs://``, ``file://``...),
    which would otherwise silently become a local directory named ``S3:``.

    Raises:
        BadInputError: ``root`` looks like ``scheme://...``.
    """
    scheme = OTHER_URL.match(str(root))
    if scheme:
        raise BadInputError(f"unsupported store location scheme {scheme.group(1)!r} in "
                            f"{str(root)!r}", fix="use a local directory or s3://bucket/prefix "
                                                  "(lower-case s3)")


BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}\Z")
"""The bucket names botocore accepts (it checks the same before any request)."""
OTHER_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?:/|\Z)")
"""A URL-like location (``scheme:/...``, two letters or more: not a drive letter) that is
not ``s3``; ``Path`` folds ``//`` to ``/`` and drops a trailing one (``gs://`` is ``gs:``)."""
