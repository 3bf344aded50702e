"""The route table of the web view: HTML pages and the JSON API, all GET.

HTML pages::

    /                       index: names, newest version, aliases, newest gate verdict
                            (?q=name&label=k[=v]&base=model&page=N)
    /v/{ref}                version page (record, files, signatures, gate records,
                            alias history, lineage graph, merge recipe and errors)
    /diff?a=REF&b=REF       two versions side by side
    /audit?page=N           audit verify result, then the log, newest first
    /verify                 verify --all of the whole store (re-hashes every blob)

JSON (the documents of the CLI's ``--json``, see :mod:`cli.web.documents`)::

    /api/ls[?name=N]            adapters ls [N]
    /api/show/{ref}             adapters show REF
    /api/diff?a=&b=             adapters diff A B
    /api/lineage/{ref}?direction=up|down   adapters lineage REF [--down]
    /api/verify[?ref=R]         adapters verify [R]   (--signatures when keys are trusted)
    /api/audit/log?limit=N      adapters audit log --limit N
    /api/audit/verify           adapters audit verify [--checkpoint ...]
    /api/alias/history/{NAME:ALIAS}   adapters alias history NAME:ALIAS
    /api/gates/{ref}            every gate record stored for a version
    /api/names?q=&label=&base=&page=   the index page's listing

Every endpoint is a plain function (Starlette runs it in its thread pool) wrapped by
:func:`cli.web.errors.guarded`, which turns errors into pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cli.web import documents, pages
from cli.web.errors import guarded
from registry.errors import AdapterkitError, BadInputError, shorten

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute
    from starlette.templating import Jinja2Templates

    from cli.web.guard import UiConfig
    from registry.audit.index import AuditIndex
    from registry.lineage_cache import LineageCache
    from registry.storage.store import Store

PER_PAGE = 50


def _int(request: Request, key: str, default: int, *, low: int = 0, high: int = 10**9) -> int:
    """An integer query parameter.

    Raises:
        BadInputError: Not an integer in ``[low, high]``.
    """
    text = request.query_params.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadInputError(f"query parameter {key}={shorten(text)} is out of range",
                            fix=f"use an integer from {low} to {high}")
    return value


def _text(request: Request, key: str) -> str:
    return request.query_params.get(key, "").strip()


def _safely_kept(kept: LineageCache, store: Store) -> AuditIndex | None:
    """The kept audit index, or None when the log fails its check (the document then reads
    the log itself and reports why)."""
    try:
        return kept.audit_index(store)
    except AdapterkitError:
        return None


def build_routes(store: Store, config: UiConfig, tpl: Jinja2Templates) -> list[BaseRoute]:
    """Every route of the view, bound to ``store`` and ``config``."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from registry.lineage_cache import LineageCache

    trusted = config.trusted or None
    lineage = LineageCache()  # child edges and audit index, kept while the store does not change

    def page(name: str, request: Request, context: dict[str, Any]) -> Response:
        return tpl.TemplateResponse(request, name, context)

    def index(request: Request) -> Response:
        ctx = pages.index_page(store, query=_text(request, "q"), label=_text(request, "label"),
                               base_model=_text(request, "base"),
                               page=_int(request, "page", 1, low=1), per_page=PER_PAGE,
                               kept=lineage)
        return page("index.html", request, ctx)

    def version(request: Request) -> Response:
        ctx = pages.version_page(store, request.path_params["ref"], trusted=trusted,
                                 lineage=lineage)
        return page("version.html", request, ctx)

    def diff(request: Request) -> Response:
        a, b = _text(request, "a"), _text(request, "b")
        ctx = pages.diff_page(store, a, b) if a and b else {"doc": None, "ref_a": a, "ref_b": b}
        return page("diff.html", request, ctx)

    def audit(request: Request) -> Response:
        ctx = pages.audit_page(store, _int(request, "page", 1, low=1),
                               checkpoints=config.checkpoints, trusted=trusted)
        return page("audit.html", request, ctx)

    def verify(request: Request) -> Response:
        return page("verify.html", request, pages.verify_page(store, trusted))

    def api(build: Callable[[Request], object]) -> Callable[[Request], Response]:
        return lambda request: JSONResponse(build(request))

    api_routes = {
        "/api/ls": lambda r: documents.ls_doc(store, _text(r, "name") or None),
        "/api/show/{ref:path}": lambda r: documents.show_doc(store, r.path_params["ref"]),
        "/api/diff": lambda r: documents.diff_doc(store, _text(r, "a"), _text(r, "b")),
        "/api/lineage/{ref:path}": lambda r: documents.lineage_doc(
            store, r.path_params["ref"], documents.check_direction(
                _text(r, "direction") or "up"), lineage=lineage),
        "/api/verify": lambda r: documents.verify_doc(store, _text(r, "ref") or None, trusted),
        "/api/audit/log": lambda r: documents.audit_log_doc(store, _int(r, "limit", 20)),
        "/api/audit/verify": lambda r: documents.audit_verify_doc(store, config.checkpoints,
                                                                  trusted),
        "/api/alias/history/{target:path}": lambda r: documents.alias_history_doc(
            store, r.path_params["target"]),
        "/api/gates/{ref:path}": lambda r: documents.gates_doc(
            store, r.path_params["ref"], _safely_kept(lineage, store)),
        "/api/names": lambda r: pages.index_page(
            store, query=_text(r, "q"), label=_text(r, "label"), base_model=_text(r, "base"),
            page=_int(r, "page", 1, low=1), per_page=PER_PAGE, kept=lineage)["listing"].to_json(),
    }
    routes: list[BaseRoute] = [
        Route("/", guarded(tpl, index), methods=["GET"]),
        Route("/v/{ref:path}", guarded(tpl, version), methods=["GET"]),
        Route("/diff", guarded(tpl, diff), methods=["GET"]),
        Route("/audit", guarded(tpl, audit), methods=["GET"]),
        Route("/verify", guarded(tpl, verify), methods=["GET"]),
    ]
    routes += [Route(path, guarded(tpl, api(build)), methods=["GET"])
               for path, build in api_routes.items()]
    return routes
