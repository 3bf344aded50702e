"""Lay out a version's lineage as a left-to-right graph, for an inline SVG.

Input: the two :class:`registry.lineage.LineageNode` trees of a version, its
ancestors (``up``) and its descendants (``down``). Output: boxes and edges with
coordinates; the template ``_graph.html`` draws them as SVG (so Jinja2's autoescape
covers every name in SVG text and attributes) and the page needs no JavaScript.

Columns: the version itself in the middle, its parents one column to the left per
generation, what was made from it one column to the right per generation. A digest
reached twice (a diamond, or a node seen on both sides) gets one box, at its first
position; every edge still appears once. Edges always run from the parent to the
derived version and carry the parent entry's role and weight (``input w=0.5``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from registry.lineage import LineageNode

NODE_W = 230
NODE_H = 44
GAP_X = 110
GAP_Y = 22
PAD = 16
MAX_LABEL = 30


@dataclass(frozen=True)
class Box:
    """One version in the drawing."""

    digest: str
    name: str | None
    label: str
    text: str
    sub: str
    x: int
    y: int
    current: bool
    missing: bool
    """Not a link: its manifest is unreadable, or its version was deleted."""


@dataclass(frozen=True)
class Edge:
    """An edge from a parent box to a derived box, with its label position."""

    src: str
    dst: str
    path: str
    label: str
    lx: int
    ly: int


@dataclass(frozen=True)
class Graph:
    """The laid-out graph."""

    boxes: list[Box]
    edges: list[Edge]
    width: int
    height: int


def edge_label(node: LineageNode) -> str:
    """``role w=weight`` of the parent entry that leads to ``node``."""
    parts = [node.role or ""]
    if node.weight is not None:
        parts.append(f"w={node.weight:g}")
    return " ".join(p for p in parts if p)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "\u2026"


def _place(up: LineageNode, down: LineageNode) -> tuple[dict[str, tuple[int, LineageNode]],
                                                         dict[tuple[str, str], str]]:
    """``digest -> (column, node)`` by breadth-first walks, and ``(src, dst) -> label``."""
    columns: dict[str, tuple[int, LineageNode]] = {up.digest: (0, up)}
    edges: dict[tuple[str, str], str] = {}
    for root, step in ((up, -1), (down, 1)):
        queue = deque([(root, 0)])
        while queue:
            node, col = queue.popleft()
            for child in node.children:
                src, dst = (child.digest, node.digest) if step < 0 else (node.digest, child.digest)
                edges.setdefault((src, dst), edge_label(child))
                if child.digest not in columns or columns[child.digest][1].repeated:
                    columns[child.digest] = (col + step, child)
                queue.append((child, col + step))
    return columns, edges


def layout(up: LineageNode, down: LineageNode) -> Graph:
    """Place the ancestors and descendants of one version (the root of both trees).

    Args:
        up: :func:`registry.lineage.ancestors` of the version.
        down: :func:`registry.lineage.descendants` of the same version.

    Returns:
        A :class:`Graph` whose boxes and edges fit in ``width`` x ``height`` pixels.
    """
    columns, edge_labels = _place(up, down)
    by_col: dict[int, list[tuple[str, LineageNode]]] = {}
    for digest, (col, node) in columns.items():
        by_col.setdefault(col, []).append((digest, node))
    first, rows = min(by_col), max(len(v) for v in by_col.values())
    step_y = NODE_H + GAP_Y
    boxes: dict[str, Box] = {}
    for col, members in sorted(by_col.items()):
        top = PAD + (rows - len(members)) * step_y // 2
        for i, (digest, node) in enumerate(members):
            flags = ("missing" if node.missing else "", "deleted" if node.deleted else "",
                     "more beyond" if node.truncated else "")
            sub = " · ".join(x for x in (node.method, *flags) if x)
            boxes[digest] = Box(digest, node.name, node.label, _clip(node.label), sub,
                                PAD + (col - first) * (NODE_W + GAP_X), top + i * step_y,
                                digest == up.digest, node.missing or node.deleted)
    edges = []
    for (src, dst), label in sorted(edge_labels.items()):
        a, b = boxes[src], boxes[dst]
        x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
        x2, y2 = b.x, b.y + NODE_H // 2
        mid = (x1 + x2) // 2
        path = f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"
        edges.append(Edge(src, dst, path, label, mid, (y1 + y2) // 2 - 4))
    width = 2 * PAD + (max(by_col) - first + 1) * (NODE_W + GAP_X) - GAP_X
    height = 2 * PAD + rows * step_y - GAP_Y
    return Graph(sorted(boxes.values(), key=lambda b: (b.x, b.y)), edges, width, height)
