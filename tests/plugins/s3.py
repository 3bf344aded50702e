"""Fixtures that run the same store tests on a local directory and on two real S3 APIs.

The backend matrix is :data:`BACKENDS`: ``local`` (a directory under ``tmp_path``),
``moto`` and ``seaweedfs``. Every test that takes :func:`store_location` runs once per
backend and gets a fresh, not yet created store: a directory, or
``s3://<bucket>/<uuid>`` (its own prefix, so tests never see each other's objects).
The store talks to both servers through boto3 exactly as it would to AWS or MinIO; no
boto3 call is mocked.

The servers themselves (moto behind one lock, SeaweedFS as a child process, the
session environment and ``$ADAPTERS_S3_CONFIG``) are :mod:`tests.support.s3_servers`.

Fixtures a test asks for by name: :func:`store_location`, :func:`s3_store_location`
(the S3 backends only), :func:`s3_endpoint`. Plain helpers a test module imports
(e.g. the crash-point tests): :func:`backend_kind`, :func:`is_s3`, :func:`environment`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3_servers import BUCKET_OF_BACKEND, S3Servers

BACKENDS = ["local", "moto", "seaweedfs"]
S3_BACKENDS = ["moto", "seaweedfs"]


@pytest.fixture(scope="session")
def s3_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Servers]:
    """The session's lazily started S3 servers (one set per xdist worker).

    Registered once, as a plugin: do not import it into a test module (a second
    registration would start a second set of servers).
    """
    servers = S3Servers(tmp_path_factory.mktemp("s3"), pytest.MonkeyPatch())
    try:
        yield servers
    finally:
        servers.stop_all()


def _location(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    if kind == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_servers").get(kind)
    return f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, not yet created store location on each backend of :data:`BACKENDS`.

    A directory under ``tmp_path``, or ``s3://<bucket>/<uuid>`` on moto or SeaweedFS.
    """
    return _location(request, tmp_path, request.param)


@pytest.fixture(params=S3_BACKENDS)
def s3_store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like :func:`store_location`, on the S3 backends only."""
    return _location(request, tmp_path, request.param)


@pytest.fixture
def s3_endpoint(s3_servers: S3Servers) -> str:
    """The moto server's endpoint URL (kept for modules written before the matrix)."""
    return s3_servers.get("moto").endpoint_url


def is_s3(location: str) -> bool:
    """Whether a store location is on S3."""
    return location.startswith("s3://")


def backend_kind(location: str) -> str:
    """``"local"``, ``"moto"`` or ``"seaweedfs"``: the backend a store location is on."""
    if not is_s3(location):
        return "local"
    bucket = location[len("s3://"):].split("/", 1)[0]
    kinds = {b: k for k, b in BUCKET_OF_BACKEND.items()}
    if bucket not in kinds:
        raise ValueError(f"{location}: not a bucket of the test servers")
    return kinds[bucket]


def environment() -> dict[str, str]:
    """The current environment (with the S3 settings), for child processes."""
    return dict(os.environ)
