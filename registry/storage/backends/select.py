"""Choose a backend from a store location: ``s3://bucket/prefix`` or a local directory.

Kept apart from :mod:`registry.storage.backends.base` (the contract), because it must
know both implementations while they import the contract: one module per direction,
no cycle. ``s3://bucket/prefix`` (also ``s3:/bucket/prefix``, which is what
``pathlib.Path`` makes of it) selects :class:`registry.storage.backends.s3.S3Backend`
-- boto3 is imported only then -- anything else is a local directory
(:class:`registry.storage.backends.local.LocalBackend`).
"""

from __future__ import annotations

from pathlib import Path

from registry.storage.backends.base import Backend


def s3_location(root: object) -> tuple[str, str] | None:
    """``(bucket, prefix)`` when ``root`` names an S3 store, else None.

    Accepts ``s3://bucket/prefix`` and the ``s3:/bucket/prefix`` that ``Path`` makes of it.
    """
    text = str(root)
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
        from registry.storage.backends.s3 import S3Backend  # boto3 only when S3 is used
        return S3Backend(*where)
    from registry.storage.backends.local import LocalBackend
    return LocalBackend(Path(root).expanduser())
