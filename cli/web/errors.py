"""Errors of the web view as responses: never a traceback in a page.

A :class:`registry.errors.AdapterkitError` becomes an error page (or the CLI's JSON
error document under ``/api/``) with a status from its kind (:func:`status_of`); any
other exception a generic 500 page (logged); an error page that fails itself, one
plain line. :func:`guarded` wraps every endpoint of :mod:`cli.web.routes` with this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from cli.web.guard import plain_response
from registry.errors import (
    AdapterkitError,
    BadInputError,
    ConflictError,
    NotFoundError,
    internal_error,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.templating import Jinja2Templates

log = logging.getLogger("adapterkit.ui")


def status_of(err: AdapterkitError) -> int:
    """The HTTP status of a library error."""
    if isinstance(err, NotFoundError):
        return 404
    if isinstance(err, ConflictError):
        return 409
    if isinstance(err, BadInputError):
        return 400
    return 500


def render_error(request: Request, err: AdapterkitError, tpl: Jinja2Templates) -> Response:
    """An error as a page, or as the CLI's JSON error document under ``/api/``."""
    from starlette.responses import JSONResponse

    status = status_of(err)
    if request.url.path.startswith("/api/"):
        return JSONResponse(err.to_json(), status_code=status)
    try:
        return tpl.TemplateResponse(request, "error.html", {"err": err}, status_code=status)
    except Exception:  # noqa: BLE001 - the error page itself failed: plain text, no trace
        log.exception("error page failed")
        return plain_response(status, f"error: {err.message}")


def guarded(tpl: Jinja2Templates, handler: Callable[[Request], Response]
            ) -> Callable[[Request], Response]:
    """Wrap a sync endpoint: library errors and bugs become pages, never tracebacks."""
    def endpoint(request: Request) -> Response:
        try:
            return handler(request)
        except AdapterkitError as err:
            return render_error(request, err, tpl)
        except Exception as err:  # noqa: BLE001 - the boundary: a bug, shown as one line
            log.exception("internal error serving %s", request.url.path)
            return render_error(request, internal_error(err), tpl)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint
