"""What each HTML page shows, gathered from the library (no decisions made here).

Each function returns the template context of one page. Failures that concern one
part of a page (a corrupt gate record, an unreadable envelope, an audit log that no
longer parses) become an ``error`` string in that part, so a damaged store still
renders with the damage shown; failures of the page's subject itself (an unknown
ref, a corrupt manifest) propagate as :class:`registry.errors.AdapterkitError` and
``cli/web/app.py`` renders them as an error page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.web import documents
from cli.web.graph import layout
from registry.errors import AdapterkitError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from registry.audit.index import AuditIndex
    from registry.lineage_cache import LineageCache
    from registry.storage.manifest import Version
    from registry.storage.store import Store

AUDIT_PAGE = 50
"""Audit entries per page."""


def _safely(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """``(fn(...), "")``, or ``(None, message)`` when the store refuses."""
    try:
        return fn(*args, **kwargs), ""
    except (AdapterkitError, ValueError, KeyError, TypeError) as err:
        return None, getattr(err, "message", None) or f"{type(err).__name__}: {err}"


def index_page(store: Store, *, query: str, label: str, base_model: str, page: int,
               per_page: int, kept: LineageCache | None = None) -> dict[str, Any]:
    """The index: one page of names (see :func:`registry.listing.list_names`; ``kept``:
    the server's kept views, for the audit index its gate verdicts consult).

    Raises:
        BadInputError: A bad page number.
    """
    from registry.listing import list_names

    listing = list_names(store, query=query or None, label=label or None,
                         base_model=base_model or None, offset=(page - 1) * per_page,
                         limit=per_page,
                         audit=(lambda: kept.audit_index(store)) if kept is not None else None)
    return {"listing": listing, "query": query, "label": label, "base_model": base_model,
            "page": page, "protected": store.protected_aliases}


def signature_rows(store: Store, version: Version,
                   trusted: dict[str, Ed25519PublicKey] | None) -> list[dict[str, Any]]:
    """One row per stored signature: key id, envelope digest and its status
    (``valid``, ``invalid``, ``untrusted`` or ``not checked`` without trusted keys)."""
    from registry.signing import check_version

    check, error = (None, "")
    if trusted:
        check, error = _safely(check_version, store, version.name, version.digest, trusted)
    rows = []
    for _, keyid, envelope in store.signature_pointers(version.digest):
        status = "not checked"
        if check is not None:
            status = ("valid" if keyid in check.valid_keyids else
                      "invalid" if keyid in check.invalid_keyids else "untrusted")
        rows.append({"keyid": keyid, "envelope": envelope, "status": status, "error": error})
    return rows


def gate_rows(store: Store, version: Version, index: AuditIndex | None = None) -> list[dict[str, Any]]:
    """Every gate record of the version: policy, verdict (or why it is untrusted), date and
    each check."""
    rows = []
    for entry in documents.gates_doc(store, version.ref, index)["records"]:
        record = entry.get("record")
        if not isinstance(record, dict):
            rows.append({"policy": entry["policy"], "error": entry.get("error") or "unreadable"})
            continue
        listed = record.get("checks")
        meta = record.get("meta")
        rows.append({"policy": entry["policy"], "error": "", "problem": entry.get("problem"),
                     "passed": record.get("passed") is True,
                     "date": str(meta.get("started", "")) if isinstance(meta, dict) else "",
                     "base": record.get("base"), "counts": _mapping(record.get("counts")),
                     "checks": [_check_row(c) for c in (listed if isinstance(listed, list) else [])
                                if isinstance(c, dict)]})
    return sorted(rows, key=lambda r: str(r.get("date", "")), reverse=True)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check_row(check: dict[str, Any]) -> dict[str, Any]:
    """One check of a gate record, every field the page shows present and of its type
    (a record is the store's data: one of another shape must not fail the page)."""
    return {"name": str(check.get("name", "?")), "kind": str(check.get("kind", "?")),
            "status": str(check.get("status", "?")), "message": str(check.get("message", "")),
            "metrics": _mapping(check.get("metrics"))}


def alias_rows(store: Store, name: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``alias -> history rows`` for every current alias of ``name``, and an error."""
    from gate.promote import alias_history

    out: dict[str, list[dict[str, Any]]] = {}
    for alias in store.aliases(name):
        rows, error = _safely(alias_history, store, name, alias)
        if error:
            return out, error
        out[alias] = rows
    return out, ""


def merge_info(version: Version) -> dict[str, Any] | None:
    """Recipe and report of a derived version: the per-module error table of a merge
    (``report.modules``) and the other report values flattened."""
    lineage = version.lineage or {}
    recipe, report = lineage.get("recipe"), lineage.get("report") or {}
    if not recipe and not report:
        return None
    given = report.get("modules")
    modules: dict[str, Any] = given if isinstance(given, dict) else {}
    table = [{"module": m, **(v if isinstance(v, dict) else {"value": v})}
             for m, v in sorted(modules.items())]
    columns = sorted({k for row in table for k in row} - {"module"})
    rest = documents.flatten({k: v for k, v in report.items() if k != "modules"})
    return {"recipe": recipe, "parameters": documents.flatten((recipe or {}).get("parameters")
                                                              or {}),
            "modules": table, "columns": columns, "report": rest}


def _bound(store: Store, parent: dict[str, Any]) -> bool:
    """Whether a lineage parent's version is still bound (a deleted one is shown, not linked);
    a parent recorded without a ref is linked by its digest, as before."""
    name = str(parent.get("ref") or "").rpartition("@")[0]
    return not name or store.is_bound(name, parent["digest"])


def _any_truncated(node: Any) -> bool:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.truncated:
            return True
        stack.extend(current.children)
    return False


def version_page(store: Store, ref: str, *, trusted: dict[str, Ed25519PublicKey] | None,
                 lineage: LineageCache | None = None) -> dict[str, Any]:
    """The version page (``lineage``: the server's kept child edges, for the descendants).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
        IntegrityError: The version's manifest is missing or corrupt.
    """
    from registry.lineage import LineageNode, ancestors, descendants
    from registry.maintenance.integrity import verify

    v = store.resolve(ref)
    # the audit index, kept by the server like the edges; a broken log is reported below
    index, _ = _safely(lineage.audit_index, store) if lineage is not None else (None, "")
    report, verify_error = _safely(lambda: verify(store, v.ref, audit_index=index))
    aliases = store.aliases(v.name)
    history, history_error = alias_rows(store, v.name)
    up = ancestors(store, v.ref)  # a parent it cannot read is drawn as missing
    # descendants read every manifest, unless the server keeps the edges
    down, lineage_error = _safely(lambda: descendants(
        store, v.ref, edges=lineage.edges(store) if lineage is not None else None))
    if down is None:
        down = LineageNode(v.digest, v.name)
    gates, gates_error = _safely(gate_rows, store, v, index)
    signatures, signatures_error = _safely(signature_rows, store, v, trusted)
    return {
        "v": v, "record_rows": documents.flatten(v.record), "aliases": aliases,
        "here": sorted(a for a, d in aliases.items() if d == v.digest),
        "protected": store.protected_aliases, "verify": report, "verify_error": verify_error,
        "history": history, "history_error": history_error,
        "graph": layout(up, down), "lineage_error": lineage_error,
        "parents": [dict(p, deleted=not _bound(store, p)) for p in (v.lineage or {}).get("parents", [])],
        "truncated": _any_truncated(up) or _any_truncated(down),
        "children": [c for c in down.children],
        "gates": gates or [], "gates_error": gates_error,
        "signatures": signatures or [], "signatures_error": signatures_error,
        "trusted": bool(trusted), "merge": merge_info(v),
    }


def diff_page(store: Store, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Both records side by side (changed rows marked) and the file changes.

    Raises:
        NotFoundError / BadInputError / IntegrityError: A ref does not resolve.
    """
    doc = documents.diff_doc(store, ref_a, ref_b)
    a, b = store.resolve(ref_a), store.resolve(ref_b)
    rec_a, rec_b = documents.flatten(a.record), documents.flatten(b.record)
    rows = [{"key": k, "a": rec_a.get(k), "b": rec_b.get(k), "changed": rec_a.get(k) != rec_b.get(k)}
            for k in sorted(rec_a.keys() | rec_b.keys())]
    return {"doc": doc, "rows": rows, "a": a, "b": b, "ref_a": ref_a, "ref_b": ref_b}


def audit_page(store: Store, page: int, *, checkpoints: tuple[Path, ...],
               trusted: dict[str, Ed25519PublicKey] | None) -> dict[str, Any]:
    """``audit verify`` (with the configured checkpoints) and one page of entries,
    newest first."""
    check, check_error = _safely(documents.audit_verify_doc, store, checkpoints, trusted)
    entries, entries_error = _safely(lambda: store.audit().entries())
    entries = list(reversed(entries or []))
    start = (max(page, 1) - 1) * AUDIT_PAGE
    return {"check": check, "check_error": check_error, "entries": entries[start:start + AUDIT_PAGE],
            "entries_error": entries_error, "page": max(page, 1), "total": len(entries),
            "has_more": start + AUDIT_PAGE < len(entries)}


def verify_page(store: Store, trusted: dict[str, Ed25519PublicKey] | None) -> dict[str, Any]:
    """``adapters verify --all`` of the whole store (every blob re-hashed)."""
    doc, error = _safely(documents.verify_doc, store, None, trusted)
    return {"doc": doc, "error": error, "trusted": bool(trusted)}
