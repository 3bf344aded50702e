"""Alias and lineage commands: ``alias set|rm|ls|history``, ``tag`` and ``lineage``.

Alias moves are compare-and-swap in the store (``--expect OLD``, read by
:func:`cli.common.parse_expect`; ``--expect none`` means "the alias must not exist
yet"); a lost race is the store's ConflictError (exit 4). ``alias history NAME:ALIAS``
lists every move of an alias from the audit log (:func:`gate.promote.alias_history`:
what was released when, by whom, forced or not and why). ``lineage`` walks parents
(``--up``) or children (``--down``) with :mod:`registry.lineage` and draws a rich
tree, JSON, or Graphviz dot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import ExpectOpt, JsonOpt, StoreOpt, open_store, parse_expect, split_alias
from cli.output import Output, escape, make_table, short_digest
from registry.errors import BadInputError, NotFoundError, shorten

if TYPE_CHECKING:
    from rich.console import Console
    from rich.tree import Tree

    from registry.lineage import LineageNode

alias_app = typer.Typer(help="Move, remove and list aliases (compare-and-swap).",
                        no_args_is_help=True)

def register(app: typer.Typer) -> None:
    """Add ``alias``, ``tag`` and ``lineage`` to ``app``."""
    app.add_typer(alias_app, name="alias")
    app.command("tag", help="Short for 'alias set NAME:ALIAS REF'.")(alias_set)
    app.command("lineage")(lineage)


@alias_app.command("set")
def alias_set(
    target: Annotated[str, typer.Argument(metavar="NAME:ALIAS")],
    ref: Annotated[str, typer.Argument(metavar="REF", help="Version to point the alias at.")],
    expect: ExpectOpt = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Point NAME:ALIAS at REF."""
    name, alias = split_alias(target)
    st = open_store(store)
    version = st.resolve(ref)
    old = st.set_alias(name, alias, version.digest, expect=parse_expect(st, expect))
    data = {"name": name, "alias": alias, "old": old, "new": version.digest}
    Output(json_out).emit(data, lambda c: c.print(
        f"{escape(name)}:{escape(alias)} {short_digest(old) if old else '(new)'} "
        f"-> {short_digest(version.digest)}"
    ))


@alias_app.command("rm")
def alias_rm(
    target: Annotated[str, typer.Argument(metavar="NAME:ALIAS")],
    expect: ExpectOpt = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Remove NAME:ALIAS (the version itself stays); exit 5 if there is no such alias."""
    name, alias = split_alias(target)
    st = open_store(store)
    old = st.delete_alias(name, alias, expect=parse_expect(st, expect))
    if old is None:  # nothing was removed (and nothing audited)
        raise NotFoundError(f"no alias {name}:{alias}",
                            fix=f"list the aliases with `adapters alias ls {name}`")
    data = {"name": name, "alias": alias, "old": old, "new": None}
    Output(json_out).emit(data, lambda c: c.print(
        f"removed {escape(name)}:{escape(alias)} (was {short_digest(old or '')})"
    ))


@alias_app.command("ls")
def alias_ls(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """List NAME's aliases."""
    st = open_store(store)
    aliases = st.aliases(name)
    if not aliases and not st.bound_hexes(name):
        raise NotFoundError(f"no versions named {name!r}", fix="list names with `adapters ls`")
    data = {"name": name, "aliases": aliases}
    rows = [(escape(a), d) for a, d in sorted(aliases.items())]
    Output(json_out).emit(data, lambda c: c.print(make_table(name, ["alias", "digest"], rows)))


@alias_app.command("history")
def alias_history(
    target: Annotated[str, typer.Argument(metavar="NAME:ALIAS", help="Alias to trace, e.g. demo:release.")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """What an alias pointed at when: every move from the audit log, oldest first."""
    from gate.promote import alias_history as history_of

    name, alias = split_alias(target)
    st = open_store(store)
    rows = history_of(st, name, alias)
    if not rows and not st.bound_hexes(name):  # a deleted name keeps its logged history
        raise NotFoundError(f"no versions named {name!r} and no history of {target!r}",
                            fix="list names with `adapters ls`")

    def render(console: Console) -> None:
        if not rows:
            console.print(f"{escape(target)} was never set")
            return
        console.print(make_table(f"history of {escape(target)}",
                                 ["seq", "time", "action", "from", "to", "actor", "reason"],
                                 [(r["seq"], r["ts"], r["action"],
                                   short_digest(r["old"]) if isinstance(r["old"], str) else "-",
                                   short_digest(r["new"]) if isinstance(r["new"], str) else "-",
                                   escape(str(r["actor"])), escape(r["reason"] or "")) for r in rows]))

    Output(json_out).emit({"alias": target, "history": rows}, render)


def lineage(
    ref: Annotated[str, typer.Argument(help="Version to start from.")],
    up: Annotated[bool, typer.Option("--up", help="Parents (default).")] = False,
    down: Annotated[bool, typer.Option("--down", help="Children instead of parents.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="tree, json or dot.")] = "tree",
    depth: Annotated[int, typer.Option("--depth", min=1, max=100,
                                       help="Generations to show (1-100).")] = 100,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Show where a version came from (--up) or what was made from it (--down)."""
    from registry import lineage as lin

    if up and down:
        raise BadInputError("--up and --down exclude each other", fix="pass one of them")
    if fmt not in ("tree", "json", "dot"):
        raise BadInputError(f"unknown --format {shorten(fmt)}", fix="use tree, json or dot")
    direction = "down" if down else "up"
    node = lin.lineage_tree(open_store(store), ref, direction, max_depth=depth)
    data = lin.to_json(node)
    out = Output(json_out or fmt == "json")
    if fmt == "dot":
        out.emit(data, lambda c: c.out(lin.to_dot(node, direction), highlight=False))
    else:
        out.emit(data, lambda c: c.print(_rich_tree(node)))


def _rich_tree(root: LineageNode) -> Tree:
    """A rich Tree of a :class:`registry.lineage.LineageNode`."""
    from rich.tree import Tree

    def label(node: LineageNode) -> str:
        text = escape(node.label)
        extra = [str(x) for x in (node.method, node.role) if x]
        if node.weight is not None:
            extra.append(f"w={node.weight:g}")
        if extra:
            text += f" [dim]({escape('; '.join(extra))})[/dim]"
        if node.missing:
            text += " [red]missing[/red]"
        if node.deleted:
            text += " [dim](deleted)[/dim]"
        if node.repeated:
            text += " [dim](see above)[/dim]"
        if node.truncated:
            text += " [dim](more generations: raise --depth)[/dim]"
        return text

    tree = Tree(label(root))
    stack = [(tree, root)]
    while stack:
        branch, node = stack.pop()
        for child in node.children:
            stack.append((branch.add(label(child)), child))
    return tree
