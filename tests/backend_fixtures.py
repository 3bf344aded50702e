"""Fixtures that run the same store tests on a local directory and on a real S3 API.

The S3 side is moto's server mode (:class:`moto.server.ThreadedMotoServer`) listening
on 127.0.0.1 on a free port, started once per session; the store talks to it through
boto3 exactly as it would to AWS or MinIO (``$AWS_ENDPOINT_URL``), no boto3 call is
mocked. Dummy credentials and a private ``$ADAPTERS_CACHE`` are set in ``os.environ``
so that worker processes spawned by the concurrency tests inherit them.

moto checks ``If-None-Match``/``If-Match`` and then writes in two steps, without a
lock, while real S3 evaluates the condition atomically. The server here therefore
runs moto's WSGI app behind one lock (one request at a time), so it honours the
atomicity S3 guarantees; without it, two racing conditional PUTs could both succeed
inside moto and the concurrency tests would measure moto, not adapterkit.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BUCKET = "adapterkit-test"
BACKENDS = ["local", "s3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serialized(app: Callable[..., Any]) -> Callable[..., Any]:
    lock = threading.Lock()

    def wrapped(environ: dict, start_response: Callable[..., Any]) -> Any:
        with lock:
            # materialise the body inside the lock: the whole request is one atomic step
            return list(app(environ, start_response))
    return wrapped


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback with bucket :data:`BUCKET`; yields its endpoint URL."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server

    class AtomicMotoServer(server_mod.ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _serialized(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    port = _free_port()
    server = AtomicMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                    "ADAPTERS_S3_CONFIG"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("ADAPTERS_CACHE", str(tmp_path_factory.mktemp("s3-cache")))
        import boto3
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, not yet created store location: a directory, or ``s3://bucket/<uuid>``."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_endpoint")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def is_s3(location: str) -> bool:
    """Whether a store location is on S3."""
    return location.startswith("s3://")


def environment() -> dict[str, str]:
    """The current environment (with the S3 settings), for child processes."""
    return dict(os.environ)
