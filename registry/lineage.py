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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry import __version__
from registry.errors import AdapterkitError, BadInputError
from registry.lineage_schema import validate_lineage

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.reader import StoreReader


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
        truncated: Its next level was cut by the depth limit.
    """

    digest: str
    name: str | None
    method: str | None = None
    role: str | None = None
    weight: float | None = None
    missing: bool = False
    repeated: bool = False
    children: tuple["LineageNode", ...] = field(default_factory=tuple)
    truncated: bool = False
    """It has parents (or children) the depth limit left out."""
    deleted: bool = False
    """Its manifest is kept (a later version names it as a parent) but its name no longer
    binds it (``adapters delete``)."""

    @property
    def label(self) -> str:
        """``name@<12 hex>``."""
        return f"{self.name or '?'}@{self.digest.split(':', 1)[1][:12]}"


def _method(manifest: dict) -> str | None:
    lineage = manifest.get("lineage") or {}
    return (lineage.get("recipe") or {}).get("method")


MAX_DEPTH = 100
"""Most generations a lineage tree shows (deeper ones are marked ``truncated``): the tree,
its JSON and DOT are built recursively, and an audited chain can be thousands deep."""


def ancestors(store: StoreReader, ref: str, *, max_depth: int | None = None) -> LineageNode:
    """The tree of versions ``ref`` was derived from (children = parents), at most
    ``max_depth`` (default and cap :data:`MAX_DEPTH`) generations deep.

    Raises:
        NotFoundError / BadInputError: Unknown or malformed ref.
    """
    start = store.resolve(ref)
    seen: set[str] = set()
    limit = _depth(max_depth)

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
        parents = (manifest.get("lineage") or {}).get("parents", [])
        kids: tuple[LineageNode, ...] = ()
        if depth < limit:
            kids = tuple(walk(p["digest"], p, depth + 1) for p in parents)
        name = manifest.get("name")
        return LineageNode(digest, name, _method(manifest), role, weight,
                           children=kids, truncated=depth >= limit and bool(parents),
                           deleted=not (isinstance(name, str) and store.is_bound(name, digest)))

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
    limit = _depth(max_depth)

    def walk(version: Version, entry: dict | None, depth: int) -> LineageNode:
        role = entry.get("role") if entry else None
        weight = entry.get("weight") if entry else None
        if version.digest in seen:
            return LineageNode(version.digest, version.name, _method(version.manifest), role,
                               weight, repeated=True)
        seen.add(version.digest)
        below = index.get(version.digest, [])
        kids: tuple[LineageNode, ...] = ()
        if depth < limit:
            kids = tuple(walk(child, e, depth + 1)
                         for child, e in sorted(below, key=lambda ce: (ce[0].created, ce[0].digest)))
        return LineageNode(version.digest, version.name, _method(version.manifest), role, weight,
                           children=kids, truncated=depth >= limit and bool(below))

    return walk(start, None, 0)


def _depth(max_depth: int | None) -> int:
    return MAX_DEPTH if max_depth is None else min(max_depth, MAX_DEPTH)


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

    Each node is ``{digest, name, label, method, role, weight, missing, repeated, truncated,
    deleted, children}``.
    """
    return {"digest": node.digest, "name": node.name, "label": node.label, "method": node.method,
            "role": node.role, "weight": node.weight, "missing": node.missing,
            "repeated": node.repeated, "truncated": node.truncated, "deleted": node.deleted,
            "children": [to_json(c) for c in node.children]}


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
