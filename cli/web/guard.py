"""The outer wall of the web view: :class:`Guard`, pure ASGI around the Starlette app.

It answers everything but GET/HEAD with 405 before any route runs, so no request can
reach code that writes; refuses a ``Host`` header outside ``allowed_hosts`` (loopback
names when serving loopback without a token: a DNS-rebinding page cannot read the
store through the victim's browser); checks the bearer token (``Authorization: Bearer
T`` or the ``adapterkit_ui`` cookie, compared with :func:`hmac.compare_digest`) on
every request when one is set; a browser gets the cookie by opening any page once
with ``?token=T`` (redirected without it); and adds security headers to every
response, among them a Content Security Policy that allows no inline script (a second
wall behind escaping). :class:`UiConfig` is what it (and the routes) are configured
with. It imports nothing of the app, so the app, the routes and their error
rendering all sit above it.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlencode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from starlette.responses import PlainTextResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    trusted: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    checkpoints: tuple[Path, ...] = ()


def plain_response(status: int, text: str, extra: Sequence[tuple[bytes, bytes]] = ()
                   ) -> PlainTextResponse:
    """A plain-text response with ``extra`` headers (refusals and last-resort errors)."""
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

    def __init__(self, app: ASGIApp, config: UiConfig) -> None:
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

    def _refusal(self, scope: Scope) -> PlainTextResponse | None:
        """The response refusing this request, or None to let it through."""
        if scope["method"] not in SAFE_METHODS:
            return plain_response(405, "read-only: only GET and HEAD are served",
                          [(b"allow", b"GET, HEAD")])
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.config.allowed_hosts is not None and hostname not in self.config.allowed_hosts:
            return plain_response(400, "unexpected Host header: open the view through the address "
                               "`adapters ui` printed")
        if self.config.token is None:
            return None
        query = scope.get("query_string", b"").decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        given = [v for k, v in pairs if k == "token"]
        if given and hmac.compare_digest(given[-1].encode(), self.config.token.encode()):
            rest = urlencode([(k, v) for k, v in pairs if k != "token"])
            # one leading slash: "//host/..." would send the browser to another site
            target = "/" + quote(scope.get("path", "/")).lstrip("/") + (f"?{rest}" if rest else "")
            cookie = (f"{COOKIE}={self.config.token}; HttpOnly; SameSite=Strict; Path=/")
            return plain_response(303, "token accepted", [(b"location", target.encode()),
                                                  (b"set-cookie", cookie.encode())])
        if not self._token_ok(headers, headers.get(b"cookie", b"").decode("latin-1")):
            return plain_response(401, "token required: send `Authorization: Bearer <token>`, or open "
                               "any page once with ?token=<token>",
                          [(b"www-authenticate", b'Bearer realm="adapterkit"')])
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing here speaks them
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", []))
                           + SECURITY_HEADERS}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
