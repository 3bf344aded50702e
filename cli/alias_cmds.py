"""Alias and lineage commands: ``alias set|rm|ls``, ``tag`` and ``lineage``.

Alias moves are compare-and-swap in the store (``--expect OLD``; ``--expect none``
means "the alias must not exist yet"); a lost race is the store's ConflictError
(exit 4). ``lineage`` walks parents (``--up``) or children (``--down``) with
:mod:`registry.lineage` and draws a rich tree, JSON, or Graphviz dot.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional

import typer

from cli.common import JsonOpt, StoreOpt, open_store, split_alias
from cli.output import Output, escape, make_table, short_digest
from registry.errors import BadInputError, NotFoundError, shorten

alias_app = typer.Typer(help="Move, remove and list aliases (compare-and-swap).",
                        no_args_is_help=True)

_DIGEST_OR_PREFIX = re.compile(r"^(sha256:)?[0-9a-f]{6,64}$")

ExpectOpt = Annotated[
    Optional[str],
    typer.Option("--expect", metavar="OLD",
                 help="Only move if the alias points here now (digest or ref; 'none': must not exist)."),
]


def register(app: typer.Typer) -> None:
    """Add ``alias``, ``tag`` and ``lineage`` to ``app``."""
    app.add_typer(alias_app, name="alias")
    app.command("tag", help="Short for 'alias set NAME:ALIAS REF'.")(alias_set)
    app.command("lineage")(lineage)


def _cas_kwargs(st: Any, name: str, expect: str | None) -> dict[str, Any]:
    """``--expect`` -> ``set_alias``/``delete_alias`` kwargs (absent: move unconditionally).

    ``none`` means "must not exist"; a digest or hex prefix goes to the store as is;
    anything else is a ref, resolved to its digest now.
    """
    if expect is None:
        return {}
    if expect.lower() in ("none", "-", ""):
        return {"expect": None}
    if _DIGEST_OR_PREFIX.match(expect):
        return {"expect": expect}
    return {"expect": st.resolve(expect).digest}


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
    old = st.set_alias(name, alias, version.digest, **_cas_kwargs(st, name, expect))
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
    old = st.delete_alias(name, alias, **_cas_kwargs(st, name, expect))
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
    data = {"name": name, "aliases": aliases}
    rows = [(escape(a), d) for a, d in sorted(aliases.items())]
    Output(json_out).emit(data, lambda c: c.print(make_table(name, ["alias", "digest"], rows)))


def lineage(
    ref: Annotated[str, typer.Argument(help="Version to start from.")],
    up: Annotated[bool, typer.Option("--up", help="Parents (default).")] = False,
    down: Annotated[bool, typer.Option("--down", help="Children instead of parents.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="tree, json or dot.")] = "tree",
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
    node = lin.lineage_tree(open_store(store), ref, direction)
    data = lin.to_json(node)
    out = Output(json_out or fmt == "json")
    if fmt == "dot":
        out.emit(data, lambda c: c.out(lin.to_dot(node, direction), highlight=False))
    else:
        out.emit(data, lambda c: c.print(_rich_tree(node)))


def _rich_tree(root: Any) -> Any:
    """A rich Tree of a :class:`registry.lineage.LineageNode`."""
    from rich.tree import Tree

    def label(node: Any) -> str:
        text = escape(node.label)
        extra = [str(x) for x in (node.method, node.role) if x]
        if node.weight is not None:
            extra.append(f"w={node.weight:g}")
        if extra:
            text += f" [dim]({escape('; '.join(extra))})[/dim]"
        if node.missing:
            text += " [red]missing[/red]"
        if node.repeated:
            text += " [dim](see above)[/dim]"
        return text

    tree = Tree(label(root))
    stack = [(tree, root)]
    while stack:
        branch, node = stack.pop()
        for child in node.children:
            stack.append((branch.add(label(child)), child))
    return tree
