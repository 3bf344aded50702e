"""``adapters ui``: serve a read-only web view of a store (:mod:`cli.web`).

``adapters ui [--store S] [--host 127.0.0.1] [--port 8765] [--token T]
[--trusted-keys KEY.pub] [--checkpoint FILE]`` opens the store, builds the app and
runs it with uvicorn until interrupted. Rules:

* loopback by default; a host that is not loopback (``0.0.0.0``, a LAN address, a
  name) needs ``--token`` (or ``$ADAPTERS_UI_TOKEN``), else exit 2 before anything
  listens. With a token every request must carry it (``Authorization: Bearer T``;
  a browser opens ``/?token=T`` once and gets a cookie); the start line says so.
* without a token the app accepts only loopback ``Host`` headers (DNS rebinding);
* ``--trusted-keys`` (default: the store's ``config.json`` ``trusted_keys``) lets the
  pages check signatures, and ``--checkpoint`` files are checked on the audit page.

Starlette, Jinja2 and uvicorn come with the ``ui`` extra; without them the command
exits 6 with ``fix: pip install 'adapterkit[ui]'``. Nothing here imports torch.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import JsonOpt, StoreOpt, open_store
from cli.output import Output, escape
from registry.errors import BadInputError, EnvironmentFailure, shorten

TOKEN_ENV = "ADAPTERS_UI_TOKEN"


def register(app: typer.Typer) -> None:
    """Add ``ui`` to ``app``."""
    app.command("ui")(ui)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        BadInputError: ``host`` is not loopback and no token is set, or the token is
            too short to be a secret.
    """
    if token is not None and len(token) < 16:
        raise BadInputError("--token must be at least 16 characters",
                            fix="use a random token, e.g. `python -c 'import secrets; "
                                "print(secrets.token_urlsafe(24))'`")
    if not is_loopback(host) and token is None:
        raise BadInputError(f"--host {shorten(host)} is not loopback: the view would be open "
                            "to the network without a token",
                            fix=f"pass --token (or set ${TOKEN_ENV}), or keep --host 127.0.0.1")


def ui(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback "
                                                     "unless --token is given).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8765,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar=TOKEN_ENV, show_default=False,
        help=f"Bearer token required on every request (or ${TOKEN_ENV}); needed off loopback.")
    ] = None,
    trusted_keys: Annotated[Optional[list[Path]], typer.Option(
        "--trusted-keys", help="Public keys to check signatures and checkpoints with "
                               "(default: config.json trusted_keys).")] = None,
    checkpoint: Annotated[Optional[list[Path]], typer.Option(
        "--checkpoint", help="Signed audit checkpoint to check the log against (repeat).")
    ] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Serve a read-only web view of the store (pip install 'adapterkit\\[ui]')."""
    from cli.web.app import create_app, missing_extra
    from cli.web.guard import LOOPBACK_HOSTS, UiConfig
    from gate.store_config import load_configured_trusted_keys
    from registry.audit.checkpoint import read_checkpoint

    check_binding(host, token)
    try:
        import uvicorn
    except ImportError as err:
        raise missing_extra(err) from None
    for path in checkpoint or ():
        read_checkpoint(path)  # a missing or unreadable file is refused now, not on the audit page
    st = open_store(store)
    config = UiConfig(token=token, allowed_hosts=None if token else LOOPBACK_HOSTS,
                      trusted=load_configured_trusted_keys(st, trusted_keys or []),
                      checkpoints=tuple(checkpoint or ()))
    app = create_app(st, config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    data = {"url": url, "store": st.location, "read_only": True, "token_required": bool(token),
            "trusted_keys": sorted(config.trusted), "checkpoints": [str(c) for c in
                                                                    config.checkpoints]}
    auth = ("token required on every request: send `Authorization: Bearer <token>` or open "
            f"{url}?token=<token> once" if token else "loopback only, no token")
    listening = listen_socket(host.strip("[]"), port)  # before saying "serving": exit 6 if not
    Output(json_out).emit(data, lambda c: c.print(
        f"serving a read-only view of {escape(st.location)} at {escape(url)} ({auth}); "
        "Ctrl-C stops"))
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           server_header=False, proxy_headers=False))
    try:
        server.run(sockets=[listening])
    except KeyboardInterrupt:  # Ctrl-C is how the view stops (uvicorn.run swallows it too)
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (uvicorn serves on it).

    Binding here, before anything is printed, turns a port in use or a host that does not
    resolve into exit 6 with a fix; uvicorn itself printed its own error after the
    "serving" line and exited 3, the code of an integrity failure.

    Raises:
        EnvironmentFailure: The address cannot be resolved or bound.
    """
    try:
        # uvicorn's rule: IPv6 only for a host written with ':', so `localhost` stays the
        # 127.0.0.1 it always was, even where /etc/hosts lists ::1 first
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise EnvironmentFailure(f"cannot listen on {shorten(host)}:{port}: {err}",
                                 fix="pass a --host this machine has (e.g. 127.0.0.1)") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise EnvironmentFailure(f"cannot listen on {shorten(host)}:{port}: {err.strerror or err}",
                                 fix="pick another --port, or stop what listens there") from err
    return sock
