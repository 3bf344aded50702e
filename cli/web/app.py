"""The read-only web view of a store: a Starlette app (``adapters ui`` serves it).

Layers, outermost first:

* :class:`Guard` (pure ASGI) answers everything but GET/HEAD with 405 before any
  route runs, so no request can reach code that writes; refuses a ``Host`` header
  outside ``allowed_hosts`` (loopback names when serving loopback without a token:
  a DNS-rebinding page cannot read the store through the victim's browser); checks
  the bearer token (``Authorization: Bearer T`` or the ``adapterkit_ui`` cookie,
  compared with :func:`hmac.compare_digest`) on every request when one is set; a
  browser gets the cookie by opening any page once with ``?token=T`` (redirected
  without it); and adds security headers to every response, among them a Content
  Security Policy that allows no inline script (a second wall behind escaping).
* routes (:mod:`cli.web.routes`) call :mod:`cli.web.pages` / :mod:`cli.web.documents`,
  which call the library, and render Jinja2 templates with autoescape on, so every
  string from the store is escaped in text, attributes and inline SVG alike. Links
  to versions are built with :func:`ref_href` (always a path under ``/v/``).
* errors: a :class:`registry.errors.AdapterkitError` becomes an error page (or the
  CLI's JSON error document under ``/api/``) with a status from its kind; any other
  exception a generic 500 page; never a traceback in a response.

Only ``registry``, ``gate.promote`` (no torch) and the CLI's own helpers are imported:
``tests/functional/test_ui_routes.py`` checks that serving pages loads no torch,
transformers or peft.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from registry.errors import (AdapterkitError, BadInputError, ConflictError, NotFoundError,
                             internal_error)

HERE = Path(__file__).resolve().parent
COOKIE = "adapterkit_ui"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SAFE_METHODS = ("GET", "HEAD")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; style-src 'self'; img-src 'self'; "
                                 b"script-src 'self'; form-action 'self'; base-uri 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
log = logging.getLogger("adapterkit.ui")


@dataclass(frozen=True)
class UiConfig:
    """What the app serves and how it checks requests.

    Attributes:
        token: Bearer token every request must carry (None: no token).
        allowed_hosts: ``Host`` header values accepted (None: any).
        trusted: Key id -> public key, for signature and checkpoint checks.
        checkpoints: Signed audit checkpoint files to check the log against.
    """

    token: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    trusted: dict[str, Any] = field(default_factory=dict)
    checkpoints: tuple[Path, ...] = ()


def ref_href(ref: str) -> str:
    """The URL path of a version page (the ref percent-encoded; never another scheme)."""
    return "/v/" + quote(str(ref), safe="/@:")


def _plain(status: int, text: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> Any:
    from starlette.responses import PlainTextResponse

    response = PlainTextResponse(text + "\n", status_code=status)
    for key, value in extra:
        response.headers[key.decode()] = value.decode()
    return response


class Guard:
    """ASGI middleware: read-only methods, allowed hosts, bearer token, security headers.

    Args:
        app: The wrapped ASGI app.
        config: The token and allowed hosts.
    """

    def __init__(self, app: Any, config: UiConfig) -> None:
        self.app = app
        self.config = config

    def _token_ok(self, headers: dict[bytes, bytes], cookies: str) -> bool:
        expected = (self.config.token or "").encode()
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), expected):
            return True
        for part in cookies.split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE and hmac.compare_digest(value.encode(), expected):
                return True
        return False

    def _refusal(self, scope: dict[str, Any]) -> Any:
        """The response refusing this request, or None to let it through."""
        if scope["method"] not in SAFE_METHODS:
            return _plain(405, "read-only: only GET and HEAD are served",
                          [(b"allow", b"GET, HEAD")])
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.config.allowed_hosts is not None and hostname not in self.config.allowed_hosts:
            return _plain(400, "unexpected Host header: open the view through the address "
                               "`adapters ui` printed")
        if self.config.token is None:
            return None
        query = scope.get("query_string", b"").decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        given = [v for k, v in pairs if k == "token"]
        if given and hmac.compare_digest(given[-1].encode(), self.config.token.encode()):
            rest = urlencode([(k, v) for k, v in pairs if k != "token"])
            target = quote(scope.get("path", "/")) + (f"?{rest}" if rest else "")
            cookie = (f"{COOKIE}={self.config.token}; HttpOnly; SameSite=Strict; Path=/")
            return _plain(303, "token accepted", [(b"location", target.encode()),
                                                  (b"set-cookie", cookie.encode())])
        if not self._token_ok(headers, headers.get(b"cookie", b"").decode("latin-1")):
            return _plain(401, "token required: send `Authorization: Bearer <token>`, or open "
                               "any page once with ?token=<token>",
                          [(b"www-authenticate", b'Bearer realm="adapterkit"')])
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing here speaks them
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", []))
                           + SECURITY_HEADERS}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def status_of(err: AdapterkitError) -> int:
    """The HTTP status of a library error."""
    if isinstance(err, NotFoundError):
        return 404
    if isinstance(err, ConflictError):
        return 409
    if isinstance(err, BadInputError):
        return 400
    return 500


def _jsonv(value: Any) -> str:
    """A value as in the CLI's tables: strings as they are, the rest as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def templates() -> Any:
    """The Jinja2 environment (autoescape on for every template) wrapped for Starlette."""
    import jinja2
    from starlette.templating import Jinja2Templates

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda d, n=12: str(d or "").split(":", 1)[-1][:n]
    env.filters["jsonv"] = _jsonv
    env.filters["vhref"] = ref_href
    env.filters["refpath"] = lambda ref: quote(str(ref), safe="/@:")
    env.filters["qs"] = lambda params: urlencode({k: v for k, v in params.items() if v})
    return Jinja2Templates(env=env)


def render_error(request: Any, err: AdapterkitError, tpl: Any) -> Any:
    """An error as a page, or as the CLI's JSON error document under ``/api/``."""
    from starlette.responses import JSONResponse

    status = status_of(err)
    if request.url.path.startswith("/api/"):
        return JSONResponse(err.to_json(), status_code=status)
    try:
        return tpl.TemplateResponse(request, "error.html", {"err": err}, status_code=status)
    except Exception:  # noqa: BLE001 - the error page itself failed: plain text, no trace
        log.exception("error page failed")
        return _plain(status, f"error: {err.message}")


def guarded(tpl: Any, handler: Any) -> Any:
    """Wrap a sync endpoint: library errors and bugs become pages, never tracebacks."""
    def endpoint(request: Any) -> Any:
        try:
            return handler(request)
        except AdapterkitError as err:
            return render_error(request, err, tpl)
        except Exception as err:  # noqa: BLE001 - the boundary: a bug, shown as one line
            log.exception("internal error serving %s", request.url.path)
            return render_error(request, internal_error(err), tpl)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint


def create_app(store: Any, config: UiConfig | None = None) -> Any:
    """The ASGI app serving ``store`` read-only.

    Args:
        store: An open :class:`registry.storage.store.Store` (local or S3).
        config: Token, allowed hosts, trusted keys and checkpoints (default: none).

    Returns:
        The app wrapped in :class:`Guard`.

    Raises:
        EnvironmentFailure: Starlette or Jinja2 is not installed.
    """
    from cli.web.routes import build_routes

    try:
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles
    except ImportError as err:  # pragma: no cover - the extra is missing
        raise missing_extra(err) from None
    config = config or UiConfig()
    tpl = templates()
    tpl.env.globals.update(location=store.location, token=config.token is not None)
    routes = build_routes(store, config, tpl)
    routes.append(Mount("/static", app=StaticFiles(directory=str(HERE / "static")),
                        name="static"))
    return Guard(Starlette(routes=routes), config)


def missing_extra(err: ImportError) -> AdapterkitError:
    """The error for a missing ``ui`` extra (exit 6: the environment lacks a package)."""
    from registry.errors import EnvironmentFailure

    return EnvironmentFailure(f"the web view needs the ui extra ({err.name or err} is missing)",
                              fix="pip install 'adapterkit[ui]'")
