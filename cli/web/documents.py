"""The JSON documents of ``/api/``: the same documents the CLI prints with ``--json``.

Each function returns exactly what the named command emits (``tests/functional/
test_ui_routes.py`` compares them key for key), built by the same library calls
(:mod:`registry.version_documents`, :mod:`registry.audit.report`,
:mod:`registry.maintenance.verify_report`, :func:`gate.promote.alias_history`): the web layer
renders, it decides nothing, and the two cannot drift apart.

Documents without a CLI counterpart: :func:`gates_doc` (every stored gate record of a
version: each record is what ``adapters gate --json`` printed) and the index page's
listing (:func:`registry.listing.list_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import BadInputError, shorten

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from registry.audit.index import AuditIndex
    from registry.lineage_cache import LineageCache
    from registry.storage.store import Store


def ls_doc(store: Store, name: str | None = None) -> dict[str, Any]:
    """``adapters ls [NAME] --json`` (:func:`registry.version_documents.ls_document`).

    Raises:
        NotFoundError: ``name`` has no versions.
        IntegrityError: A manifest is unreadable.
    """
    from registry.version_documents import ls_document

    return ls_document(store, name)


def show_doc(store: Store, ref: str) -> dict[str, Any]:
    """``adapters show REF --json`` (:func:`registry.version_documents.show_document`).

    Raises:
        NotFoundError / BadInputError / IntegrityError: As :meth:`Store.resolve`.
    """
    from registry.version_documents import show_document

    return show_document(store, ref)


def flatten(record: Any) -> dict[str, Any]:
    """A record as ``{"a.b": value}`` (the CLI's ``show``/``diff`` flattening)."""
    from registry.diff import flatten as flatten_record

    return flatten_record(record)


def diff_doc(store: Store, ref_a: str, ref_b: str) -> dict[str, Any]:
    """``adapters diff REF1 REF2 --json`` (:func:`registry.diff.diff_versions`).

    Raises:
        NotFoundError / BadInputError / IntegrityError: As :meth:`Store.resolve`.
    """
    from registry.diff import diff_versions

    return diff_versions(store, ref_a, ref_b)


def lineage_doc(store: Store, ref: str, direction: str = "up", *,
                lineage: LineageCache | None = None) -> dict[str, Any]:
    """``adapters lineage REF [--down] --json`` (``lineage``: the server's kept child edges).

    Raises:
        BadInputError: ``direction`` is not ``up``/``down``; a malformed ref.
        NotFoundError: Unknown ref.
    """
    from registry import lineage as lin

    edges = lineage.edges(store) if lineage is not None and direction == "down" else None
    return lin.to_json(lin.lineage_tree(store, ref, direction, edges=edges))


def verify_doc(store: Store, ref: str | None = None,
               trusted: dict[str, Ed25519PublicKey] | None = None) -> dict[str, Any]:
    """``adapters verify [REF] [--signatures --trusted-keys K] --json`` (with its ``error``
    key when the store does not verify; the web view answers 200 either way).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    from registry.maintenance.integrity import verify
    from registry.maintenance.verify_report import verify_error

    report = verify(store, ref, trusted=trusted)
    data = report.to_json()
    error = verify_error(report)
    if error is not None:  # the failing CLI document's fields, at its top level
        data.update(error.to_json())
    return data


def audit_log_doc(store: Store, limit: int = 20) -> dict[str, Any]:
    """``adapters audit log --limit N --json`` (0: every entry).

    Raises:
        IntegrityError: A line of the log does not parse.
    """
    from registry.audit.report import newest_entries

    return {"entries": newest_entries(store, limit)}


def audit_verify_doc(store: Store, checkpoints: list[Path] | tuple[Path, ...] = (),
                     trusted: dict[str, Ed25519PublicKey] | None = None) -> dict[str, Any]:
    """``adapters audit verify [--checkpoint F --trusted-keys K] --json`` (with ``error``,
    ``message``, ``fix`` and ``exit_code`` when a problem is found).

    Raises:
        BadInputError / IntegrityError: A checkpoint file is unreadable or malformed.
    """
    from registry.audit.report import audit_document, audit_error

    data = audit_document(store, checkpoints, trusted)
    error = audit_error(data)
    if error is not None:
        data.update(error.to_json())
    return data


def alias_history_doc(store: Store, target: str) -> dict[str, Any]:
    """``adapters alias history NAME:ALIAS --json``.

    Raises:
        BadInputError: Not ``NAME:ALIAS``.
        IntegrityError: The audit log is unreadable.
    """
    from cli.common import split_alias
    from gate.promote import alias_history

    name, alias = split_alias(target)
    return {"alias": target, "history": alias_history(store, name, alias)}


def gates_doc(store: Store, ref: str, index: AuditIndex | None = None) -> dict[str, Any]:
    """Every gate record stored for a version (:func:`registry.version_documents.gates_document`).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    from registry.version_documents import gates_document

    return gates_document(store, ref, index)


def check_direction(direction: str) -> str:
    """``up`` or ``down``.

    Raises:
        BadInputError: Anything else.
    """
    if direction not in ("up", "down"):
        raise BadInputError(f"direction must be up or down, got {shorten(direction)}",
                            fix="use ?direction=up or ?direction=down")
    return direction
