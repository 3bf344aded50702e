"""The read-only web view of a store: a Starlette app (``adapters ui`` serves it).

Layers, outermost first:

* :class:`cli.web.guard.Guard` (pure ASGI): GET/HEAD only, allowed hosts, bearer
  token, security headers (a Content Security Policy that allows no inline script).
* routes (:mod:`cli.web.routes`) call :mod:`cli.web.pages` / :mod:`cli.web.documents`,
  which call the library, and render Jinja2 templates with autoescape on, so every
  string from the store is escaped in text, attributes and inline SVG alike. Links
  to versions are built with :func:`ref_href` (always a path under ``/v/``).
* errors (:mod:`cli.web.errors`): a :class:`registry.errors.AdapterkitError` becomes
  an error page (or the CLI's JSON error document under ``/api/``) with a status from
  its kind; any other exception a generic 500 page; never a traceback in a response.

This module assembles them (templates, routes, static files, the guard); it imports
the routes, which import only the layers below it, so there is no cycle.

Only ``registry``, ``gate.promote`` (no torch) and the CLI's own helpers are imported:
``tests/functional/test_ui_routes.py`` checks that serving pages loads no torch,
transformers or peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from cli.web.guard import Guard, UiConfig
from cli.web.routes import build_routes
from registry.errors import AdapterkitError

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

    from registry.storage.store import Store

HERE = Path(__file__).resolve().parent


def ref_href(ref: str) -> str:
    """The URL path of a version page (the ref percent-encoded; never another scheme)."""
    return "/v/" + quote(str(ref), safe="/@:")


def _jsonv(value: Any) -> str:
    """A value as in the CLI's tables: strings as they are, the rest as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def templates() -> Jinja2Templates:
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


def create_app(store: Store, config: UiConfig | None = None) -> Guard:
    """The ASGI app serving ``store`` read-only.

    Args:
        store: An open :class:`registry.storage.store.Store` (local or S3).
        config: Token, allowed hosts, trusted keys and checkpoints (default: none).

    Returns:
        The app wrapped in :class:`Guard`.

    Raises:
        EnvironmentFailure: Starlette or Jinja2 is not installed.
    """
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
