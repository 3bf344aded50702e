"""The JSON documents of ``/api/``: the same documents the CLI prints with ``--json``.

Each function returns exactly what the named command emits (``tests/functional/
test_ui_routes.py`` compares them key for key), built from the same library calls:
the web layer renders, it decides nothing. Where the CLI's document needs one of its
small formatting helpers (flattening a record, the wording of a verify failure) the
helper is imported from the command module rather than copied, so the two cannot
drift apart.

Documents without a CLI counterpart: :func:`gates_doc` (every stored gate record of a
version: each record is what ``adapters gate --json`` printed) and the index page's
listing (:func:`registry.listing.list_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import AdapterkitError, BadInputError, IntegrityError, shorten

if TYPE_CHECKING:
    from registry.storage.store import Store


def ls_doc(store: Store, name: str | None = None) -> dict[str, Any]:
    """``adapters ls [NAME] --json``.

    Raises:
        NotFoundError: ``name`` has no versions.
        IntegrityError: A manifest is unreadable.
    """
    entries = []
    for n in [name] if name else store.names():
        aliases = store.aliases(n)
        versions = [{"digest": v.digest, "created": v.created, "size": v.size,
                     "aliases": sorted(a for a, d in aliases.items() if d == v.digest)}
                    for v in store.versions(n)]
        entries.append({"name": n, "aliases": aliases, "versions": versions})
    return {"names": entries}


def show_doc(store: Store, ref: str) -> dict[str, Any]:
    """``adapters show REF --json``.

    Raises:
        NotFoundError / BadInputError / IntegrityError: As :meth:`Store.resolve`.
    """
    from registry.lineage import descendants

    v = store.resolve(ref)
    lineage = v.lineage or {}
    children = descendants(store, v.ref, max_depth=1).children
    return {**v.to_json(),
            "aliases": sorted(a for a, d in store.aliases(v.name).items() if d == v.digest),
            "lineage": {"parents": lineage.get("parents", []), "recipe": lineage.get("recipe"),
                        "children": [f"{c.name}@{c.digest}" for c in children]}}


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


def lineage_doc(store: Store, ref: str, direction: str = "up") -> dict[str, Any]:
    """``adapters lineage REF [--down] --json``.

    Raises:
        BadInputError: ``direction`` is not ``up``/``down``; a malformed ref.
        NotFoundError: Unknown ref.
    """
    from registry import lineage as lin

    return lin.to_json(lin.lineage_tree(store, ref, direction))


def verify_doc(store: Store, ref: str | None = None,
               trusted: dict[str, Any] | None = None) -> dict[str, Any]:
    """``adapters verify [REF] [--signatures --trusted-keys K] --json`` (with its ``error``
    key when the store does not verify; the web view answers 200 either way).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    from cli.audit_cmds import _problem_fix, _problem_line
    from registry.maintenance.integrity import verify

    report = verify(store, ref, trusted=trusted)
    data = report.to_json()
    if not report.ok:
        first = report.problems[0]
        data["error"] = IntegrityError(f"{len(report.problems)} problem(s) in the store, first: "
                                       f"{_problem_line(first)}",
                                       fix=_problem_fix(first.kind)).to_json()
    return data


def audit_log_doc(store: Store, limit: int = 20) -> dict[str, Any]:
    """``adapters audit log --limit N --json`` (0: every entry).

    Raises:
        IntegrityError: A line of the log does not parse.
    """
    entries = store.audit().entries()
    return {"entries": entries[-limit:] if limit > 0 else entries}


def audit_verify_doc(store: Store, checkpoints: list[Path] | tuple[Path, ...] = (),
                     trusted: dict[str, Any] | None = None) -> dict[str, Any]:
    """``adapters audit verify [--checkpoint F --trusted-keys K] --json`` (with ``error``
    when a problem is found).

    Raises:
        BadInputError / IntegrityError: A checkpoint file is unreadable or malformed.
    """
    from cli.audit_cmds import _where

    report = store.audit().verify()
    data = report.to_json()
    if checkpoints:
        from registry.audit.checkpoint import check_checkpoint, read_checkpoint

        entries = store.audit().entries() if report.ok else []
        data["checkpoints"] = []
        for path in checkpoints:
            seq, problems = check_checkpoint(read_checkpoint(path), entries, trusted or {})
            data["checkpoints"].append({"file": str(path), "seq": seq, "ok": not problems})
            data["problems"] += [{"line": 0, "kind": "checkpoint", "message": f"{path}: {m}"}
                                 for m in problems]
    if data["problems"]:
        first = data["problems"][0]
        data["error"] = IntegrityError(
            f"audit {_where(first)}: {first['message']}",
            fix="the log was edited, reordered, truncated or rewritten; restore it from a backup",
        ).to_json()
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


def gates_doc(store: Store, ref: str) -> dict[str, Any]:
    """Every gate record stored for a version: ``{"candidate", "digest", "records":
    [{"policy", "record"} | {"policy", "error"}]}`` (``record`` is the gate's JSON).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    name, digest = store.resolve_digest(ref)
    records = []
    for key in store.backend.list(f"gates/{digest.split(':', 1)[1]}/"):
        policy = "sha256:" + key.rsplit("/", 1)[1]
        try:
            record = store.gate_record(digest, policy)
        except (AdapterkitError, ValueError) as err:
            records.append({"policy": policy, "error": getattr(err, "message", str(err))})
            continue
        if record is not None:
            records.append({"policy": policy, "record": record})
    return {"candidate": f"{name}@{digest}", "digest": digest, "records": records}


def check_direction(direction: str) -> str:
    """``up`` or ``down``.

    Raises:
        BadInputError: Anything else.
    """
    if direction not in ("up", "down"):
        raise BadInputError(f"direction must be up or down, got {shorten(direction)}",
                            fix="use ?direction=up or ?direction=down")
    return direction
