"""Lineage: which versions a version was made from, and how.

A manifest's ``lineage`` (part of the version digest) is::

    {"parents": [{"digest": "sha256:..", "ref": "a@sha256:..", "role": "input",
                  "weight": 0.5}],
     "recipe": {"method": "ties", "parameters": {...}, "tool": "adapterkit",
                "tool_version": "0.1.0"} | null,
     "report": {...free-form JSON: per-module errors, norms...} | null}

Queries walk the graph in either direction: :func:`ancestors` follows ``parents``
(manifests are read by digest, so history survives even if a parent's name binding
was deleted: gc keeps manifests that are still named as parents), :func:`descendants`
scans every bound manifest for versions naming the start as a parent. Both return a
:class:`LineageNode` tree that :func:`to_json` and :func:`to_dot` (Graphviz)
render; a node reached twice (a diamond) is marked ``repeated`` and
not expanded again. The CLI only prints these strings/dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry import __version__
from registry.digests import canonical_json, is_digest
from registry.errors import AdapterkitError, BadInputError

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.reader import StoreReader


def _bad(field_name: str, msg: str, got: Any = ...) -> BadInputError:
    detail = "" if got is ... else f", got {got!r}"
    return BadInputError(f"lineage.{field_name} {msg}{detail}",
                         fix="see DESIGN.md (manifest lineage) for the expected shape")


def _parent(entry: Any, i: int) -> dict[str, Any]:
    where = f"parents[{i}]"
    if not isinstance(entry, dict):
        raise _bad(where, "must be an object", entry)
    unknown = set(entry) - {"digest", "ref", "role", "weight"}
    if unknown:
        raise _bad(f"{where}.{sorted(unknown)[0]}", "is not a known field")
    if not is_digest(entry.get("digest")):
        raise _bad(f"{where}.digest", "must be 'sha256:' + 64 hex digits", entry.get("digest"))
    ref, role, weight = entry.get("ref"), entry.get("role", "input"), entry.get("weight")
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise _bad(f"{where}.ref", "must be a non-empty string or null", ref)
    if not isinstance(role, str) or not role:
        raise _bad(f"{where}.role", "must be a non-empty string", role)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight)):
        raise _bad(f"{where}.weight", "must be a finite number or null", weight)
    return {"digest": entry["digest"], "ref": ref, "role": role, "weight": weight}


def validate_lineage(lineage: dict | None) -> dict | None:
    """Check and normalise a lineage object (None passes through).

    Raises:
        BadInputError: A field is missing or malformed (the message names it).
    """
    if lineage is None:
        return None
    if not isinstance(lineage, dict):
        raise _bad("(root)", "must be an object or null", lineage)
    unknown = set(lineage) - {"parents", "recipe", "report"}
    if unknown:
        raise _bad(sorted(unknown)[0], "is not a known field")
    parents = lineage.get("parents")
    parents = [] if parents is None else parents
    if not isinstance(parents, list):
        raise _bad("parents", "must be a list", parents)
    recipe = lineage.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, dict):
            raise _bad("recipe", "must be an object or null", recipe)
        unknown = set(recipe) - {"method", "parameters", "tool", "tool_version"}
        if unknown:
            raise _bad(f"recipe.{sorted(unknown)[0]}", "is not a known field")
        if not isinstance(recipe.get("method"), str) or not recipe["method"]:
            raise _bad("recipe.method", "must be a non-empty string", recipe.get("method"))
        params = recipe.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise _bad("recipe.parameters", "must be an object", params)
        recipe = {"method": recipe["method"], "parameters": params,
                  "tool": str(recipe.get("tool") or "adapterkit"),
                  "tool_version": str(recipe.get("tool_version") or __version__)}
    report = lineage.get("report")
    if report is not None and not isinstance(report, dict):
        raise _bad("report", "must be an object or null", report)
    out = {"parents": [_parent(p, i) for i, p in enumerate(parents)], "recipe": recipe,
           "report": report}
    try:
        canonical_json(out)
    except BadInputError as err:
        raise _bad("(root)", f"must be JSON: {err.message}") from None
    return out


def parent(version: Version, *, role: str = "input", weight: float | None = None) -> dict:
    """A lineage parent entry for a stored version."""
    return {"digest": version.digest, "ref": version.ref, "role": role, "weight": weight}


def make_lineage(parents: Iterable[dict], *, method: str, parameters: dict | None = None,
                 tool: str = "adapterkit", tool_version: str | None = None,
                 report: dict | None = None) -> dict:
    """Build a validated lineage object (see :func:`parent` for the entries).

    Raises:
        BadInputError: Malformed parents, method or non-JSON parameters/report.
    """
    return validate_lineage({"parents": list(parents),
                             "recipe": {"method": method, "parameters": parameters or {},
                                        "tool": tool, "tool_version": tool_version or __version__},
                             "report": report})  # type: ignore[return-value]


@dataclass(frozen=True)
class LineageNode:
    """One version in a lineage tree.

    Attributes:
        digest: Version digest.
        name: Its name (None if its manifest is missing).
        method: The recipe method that produced it, if any.
        role, weight: How the edge to its tree parent is labelled (the parent entry).
        missing: Its manifest could not be read.
        repeated: Already shown elsewhere in the tree (not expanded again).
        children: Next level (parents when going up, derived versions going down).
    """

    digest: str
    name: str | None
    method: str | None = None
    role: str | None = None
    weight: float | None = None
    missing: bool = False
    repeated: bool = False
    children: tuple["LineageNode", ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """``name@<12 hex>``."""
        return f"{self.name or '?'}@{self.digest.split(':', 1)[1][:12]}"


def _method(manifest: dict) -> str | None:
    lineage = manifest.get("lineage") or {}
    return (lineage.get("recipe") or {}).get("method")


def ancestors(store: StoreReader, ref: str, *, max_depth: int | None = None) -> LineageNode:
    """The tree of versions ``ref`` was derived from (children = parents).

    Raises:
        NotFoundError / BadInputError: Unknown or malformed ref.
    """
    start = store.resolve(ref)
    seen: set[str] = set()

    def walk(digest: str, entry: dict | None, depth: int) -> LineageNode:
        role = entry.get("role") if entry else None
        weight = entry.get("weight") if entry else None
        try:
            manifest = store.load_manifest(digest)
        except AdapterkitError:
            return LineageNode(digest, None, role=role, weight=weight, missing=True)
        if digest in seen:
            return LineageNode(digest, manifest.get("name"), _method(manifest), role, weight,
                               repeated=True)
        seen.add(digest)
        kids: tuple[LineageNode, ...] = ()
        if max_depth is None or depth < max_depth:
            kids = tuple(walk(p["digest"], p, depth + 1)
                         for p in (manifest.get("lineage") or {}).get("parents", []))
        return LineageNode(digest, manifest.get("name"), _method(manifest), role, weight,
                           children=kids)

    return walk(start.digest, None, 0)


ChildEdges = Mapping[str, Sequence[tuple["Version", dict]]]
"""Parent digest -> every ``(child version, its lineage entry naming that parent)``."""


def child_edges(store: StoreReader) -> dict[str, list[tuple[Version, dict]]]:
    """The :data:`ChildEdges` of every bound version: one read of every manifest (a
    manifest names its parents, not its children).

    Raises:
        IntegrityError: A bound manifest is missing or corrupt.
    """
    index: dict[str, list[tuple[Version, dict]]] = {}
    for version in store.versions():
        for entry in (version.lineage or {}).get("parents", []):
            index.setdefault(entry["digest"], []).append((version, entry))
    return index


def descendants(store: StoreReader, ref: str, *, max_depth: int | None = None,
                edges: ChildEdges | None = None) -> LineageNode:
    """The tree of versions derived from ``ref`` (children = versions naming it a parent).

    ``edges``: the store's :func:`child_edges` when the caller keeps them (the web view,
    :mod:`registry.lineage_cache`); read afresh otherwise.

    Raises:
        NotFoundError / BadInputError: Unknown or malformed ref.
    """
    start = store.resolve(ref)
    index = child_edges(store) if edges is None else edges
    seen: set[str] = set()

    def walk(version: Version, entry: dict | None, depth: int) -> LineageNode:
        role = entry.get("role") if entry else None
        weight = entry.get("weight") if entry else None
        if version.digest in seen:
            return LineageNode(version.digest, version.name, _method(version.manifest), role,
                               weight, repeated=True)
        seen.add(version.digest)
        kids: tuple[LineageNode, ...] = ()
        if max_depth is None or depth < max_depth:
            kids = tuple(walk(child, e, depth + 1)
                         for child, e in sorted(index.get(version.digest, []),
                                                key=lambda ce: (ce[0].created, ce[0].digest)))
        return LineageNode(version.digest, version.name, _method(version.manifest), role, weight,
                           children=kids)

    return walk(start, None, 0)


def lineage_tree(store: StoreReader, ref: str, direction: str = "up", *,
                 max_depth: int | None = None, edges: ChildEdges | None = None) -> LineageNode:
    """:func:`ancestors` for ``direction="up"``, :func:`descendants` (with ``edges``) for ``"down"``.

    Raises:
        BadInputError: Unknown direction or malformed ref.
        NotFoundError: Unknown ref.
    """
    if direction == "up":
        return ancestors(store, ref, max_depth=max_depth)
    if direction == "down":
        return descendants(store, ref, max_depth=max_depth, edges=edges)
    raise BadInputError(f"direction must be 'up' or 'down', got {direction!r}",
                        fix="use --up or --down")


def to_json(node: LineageNode) -> dict[str, Any]:
    """Nested JSON form.

    Each node is ``{digest, name, label, method, role, weight, missing, repeated, children}``.
    """
    return {"digest": node.digest, "name": node.name, "label": node.label, "method": node.method,
            "role": node.role, "weight": node.weight, "missing": node.missing,
            "repeated": node.repeated, "children": [to_json(c) for c in node.children]}


def _edge_label(node: LineageNode) -> str:
    parts = [node.role or ""]
    if node.weight is not None:
        parts.append(f"w={node.weight:g}")
    return " ".join(p for p in parts if p)


def to_dot(node: LineageNode, direction: str = "up") -> str:
    """Graphviz DOT text; edges always point from parent to derived version."""
    nodes: dict[str, LineageNode] = {}
    edges: set[tuple[str, str, str]] = set()

    def walk(n: LineageNode) -> None:
        if n.digest not in nodes or nodes[n.digest].repeated:
            nodes[n.digest] = n
        for child in n.children:
            src, dst = (child.digest, n.digest) if direction == "up" else (n.digest, child.digest)
            edges.add((src, dst, _edge_label(child)))
            walk(child)

    walk(node)

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"')

    def q(text: str) -> str:
        return f'"{esc(text)}"'

    out = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    for digest, n in sorted(nodes.items()):
        rows = [n.label] + ([n.method] if n.method else []) + (["(missing)"] if n.missing else [])
        label = '"' + "\\n".join(esc(r) for r in rows) + '"'
        style = ", style=bold" if digest == node.digest else ""
        out.append(f"  {q(digest)} [label={label}{style}];")
    for src, dst, label in sorted(edges):
        out.append(f"  {q(src)} -> {q(dst)}" + (f" [label={q(label)}]" if label else "") + ";")
    out.append("}")
    return "\n".join(out) + "\n"
