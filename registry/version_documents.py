"""The read-side documents of versions: ``ls``, ``show`` and a version's gate records.

``adapters ls|show --json`` and the web view's ``/api/ls``, ``/api/show`` and
``/api/gates`` return these same dicts, so what a listing holds (every name's aliases,
its versions newest first, each with the aliases pointing at it) and what ``show``
adds to a version (its aliases, parents, recipe and direct children) is decided here,
once, and both callers only render. Store reads only: nothing here writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.errors import AdapterkitError, IntegrityError

if TYPE_CHECKING:
    from registry.audit.index import AuditIndex
    from registry.storage.store import Store


def ls_document(store: Store, name: str | None = None) -> dict[str, Any]:
    """``{"names": [{"name", "aliases", "versions": [{"digest", "created", "size",
    "aliases"}]}]}`` for ``name`` (None: every name).

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


def show_document(store: Store, ref: str) -> dict[str, Any]:
    """A version's JSON plus ``aliases`` (pointing at it) and ``lineage`` (``parents``,
    ``recipe``, ``report``: what the run measured and its environment, ``children`` one
    level down as ``name@digest``; None, with ``children_problem``, when another version's
    damaged manifest keeps them from being listed).

    Raises:
        NotFoundError / BadInputError / IntegrityError: As :meth:`Store.resolve`.
    """
    from registry.lineage import descendants

    version = store.resolve(ref)
    lineage = version.lineage or {}
    try:  # children are found by reading every manifest: another version's damage is not this one's
        children: list[str] | None = [f"{c.name}@{c.digest}"
                                      for c in descendants(store, version.ref, max_depth=1).children]
        problem = None
    except IntegrityError as err:
        children, problem = None, err.message
    return {**version.to_json(),
            "aliases": sorted(a for a, d in store.aliases(version.name).items()
                              if d == version.digest),
            "lineage": {"parents": lineage.get("parents", []), "recipe": lineage.get("recipe"),
                        "report": lineage.get("report"), "children": children,
                        **({"children_problem": problem} if problem else {})}}


def gates_document(store: Store, ref: str, index: AuditIndex | None = None) -> dict[str, Any]:
    """Every gate record stored for a version: ``{"candidate", "digest", "records":
    [{"policy", "record", "problem"} | {"policy", "error"}]}`` (``record`` is the gate's
    JSON; a record that cannot be read is listed with its error, not fatal). ``problem``
    is None for a record ``promote`` would trust, else why not: it names another version
    or policy, no audit entry vouches for it, or the audit log fails its chain check
    (:func:`registry.audit.index.gate_record_problem`).

    ``index``: the store's audit index, if a long-running reader keeps one (else it is read
    here, once, when the version has a record).

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    from registry.audit.index import GateVouching

    name, digest = store.resolve_digest(ref)
    records = []
    vouching = GateVouching(store, (lambda: index) if index is not None else None)
    for key in store.backend.list(f"gates/{digest.split(':', 1)[1]}/"):
        policy = "sha256:" + key.rsplit("/", 1)[1]
        try:
            record = store.gate_record(digest, policy)
        except (AdapterkitError, ValueError) as err:
            records.append({"policy": policy, "error": getattr(err, "message", str(err))})
            continue
        if record is None:
            continue
        records.append({"policy": policy, "record": record, "problem": vouching.problem(
            digest, policy, record, store.read_pointer(key))})
    return {"candidate": f"{name}@{digest}", "digest": digest, "records": records}
