"""Options and small parsers shared by the command modules.

This is the one module of shared typer options: every command takes ``--json`` and
``--store PATH``, every alias move ``--expect OLD``; the annotated aliases here keep
their spelling and help text identical everywhere (and :func:`parse_expect` is the
one reading of ``--expect``). The parsers turn command-line
strings (``k=v`` pairs, ``30s``/``10m``/``1h``/``2d`` durations, ``NAME:ALIAS``)
into values and raise :class:`registry.errors.BadInputError` (exit 2) on bad input,
so ``cli/main.py`` reports them like every other error.

:func:`open_store` also turns the environment's refusals into exit 6
(:class:`registry.errors.EnvironmentFailure`) naming the store: a store path that
is a file (or under one), a permission or I/O error while opening it. Values quoted
in messages go through :func:`registry.errors.shorten` (bounded).

Only the standard library, typer and ``registry.errors`` are imported here: the
store itself is imported inside :func:`open_store`, when a command runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from registry.errors import (BadInputError, EnvironmentFailure, UsageError, environment_error,
                             shorten)
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.store import Store

def check_utf8(args: list[str]) -> None:
    """Refuse arguments and ``ADAPTERS_*`` variables that are not UTF-8 text.

    Python hands undecodable bytes over as lone surrogates; every name, path and value is
    eventually written into UTF-8 JSON (a manifest, the audit log, the store's config), so
    such a value would fail half way through a command (``init`` left a directory that was
    no store, ``push`` orphan blobs). Refused before anything runs instead.

    Raises:
        BadInputError: A value holds bytes that are not UTF-8 (exit 2).
    """
    import os

    named = [(f"argument {shorten(a)}", a) for a in args]
    named += [(f"${key}", value) for key, value in os.environ.items() if key.startswith("ADAPTERS_")]
    for where, value in named:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadInputError(f"{where} is not valid UTF-8 text",
                                fix="pass names, paths and values as UTF-8 (rename a file "
                                    "whose name is not)") from None


def check_nonempty(args: list[str]) -> None:
    """Refuse an empty argument or option value (``--policy "$UNSET"``, ``--out=``).

    An empty path reads as ``.``: ``--store ""`` opened the current directory, and
    ``--policy ""``, ``--base ""`` or an empty ``OUT`` named it too. No argument of any
    command means anything when empty (names, refs, reasons, tokens included), so the
    rule is global and checked before anything runs.

    Raises:
        UsageError: An argument is the empty string (exit 2).
    """
    for i, arg in enumerate(args):
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            option = arg[:-1]
        elif arg == "":
            before = args[i - 1] if i else ""
            option = before if before.startswith("--") and "=" not in before else ""
        else:
            continue
        where = f"empty value for {shorten(option)}" if option else "an empty argument"
        raise UsageError(f"{where} (an unset shell variable?)",
                         fix="pass a value, or leave the option out")


def _json_parsed(ctx: typer.Context, value: bool) -> bool:
    """Record the parsed ``--json`` on the root context, so ``cli/main.py`` reports an error in
    the mode the command was given: a value that happens to read ``--json`` (``--license
    --json``) does not switch errors to JSON."""
    root = ctx.find_root()
    if isinstance(root.obj, dict):
        root.obj["json"] = bool(value)
    return value


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.",
                                       callback=_json_parsed)]
StoreOpt = Annotated[
    Optional[str],  # a str: Path would fold s3:///bucket into s3:/bucket
    typer.Option("--store", help="Store directory (default: $ADAPTERS_HOME or ~/.adapters).",
                 show_default=False),
]
ExpectOpt = Annotated[
    Optional[str],
    typer.Option("--expect", metavar="OLD",
                 help="Only move if the alias points here now (digest or ref; 'none': must not exist)."),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", metavar="DEVICE",
                 help="cpu, cuda (or cuda:N) or auto: CUDA when torch sees one, else the CPU."),
]
"""``--device`` of merge, quantize, unload, gate and merge-search (default ``auto``),
resolved by :func:`merging.devices.resolve_device` inside the command."""
AllowBaseMismatchOpt = Annotated[
    bool,
    typer.Option("--allow-base-mismatch",
                 help="Accept inputs whose bases share the structure but not the weights."),
]


_DIGEST_OR_PREFIX = re.compile(r"^(sha256:)?[0-9a-f]{6,64}\Z")


def parse_expect(st: Store, expect: str | None) -> str | None | object:
    """``--expect OLD`` -> the ``expect`` value of ``Store.set_alias``/``delete_alias``.

    Absent: :data:`registry.storage.store.ANY` (move unconditionally); ``none`` (or ``-``, or
    empty): None, the alias must not exist; a digest or hex prefix goes to the store as
    written (it resolves prefixes itself); anything else is a ref, resolved to its
    digest now.

    Raises:
        NotFoundError / BadInputError: ``expect`` is a ref that does not resolve.
    """
    from registry.storage.store import ANY

    if expect is None:
        return ANY
    if expect.lower() in ("none", "-", ""):
        return None
    if _DIGEST_OR_PREFIX.match(expect):
        return expect
    return st.resolve(expect).digest


def _check_store_path(root: Path | None) -> None:
    """Refuse a local store path that is a file or lies under one (exit 6).

    Raises:
        EnvironmentFailure: ``root`` or one of its parents exists and is not a directory.
    """
    from registry.storage.backends.select import s3_location
    from registry.storage.store import default_root

    if root is not None and s3_location(root) is not None:
        return
    path = Path(root).expanduser() if root is not None else default_root()
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "is a file" if candidate == path else f"is under the file {candidate}"
            raise EnvironmentFailure(
                f"store path {shorten(str(path))} {where}, not a directory",
                fix="pass --store (or set $ADAPTERS_HOME to) a directory, or move the file away")
        if candidate.exists():
            return


def open_store(root: Path | str | None, *, create: bool = False) -> Store:
    """Open the store at ``root`` (None: ``$ADAPTERS_HOME`` or ``~/.adapters``).

    Raises:
        NotFoundError: The store does not exist and ``create`` is False.
        EnvironmentFailure: The path is a file (or under one), or the system refused
            to read or create it (permission, read-only file system, disk full).
        BadInputError: ``root`` is empty or blank (``--store "$UNSET"``).
    """
    from registry.storage.store import Store

    if root is not None and not str(root).strip():  # Path("") is the current directory
        raise BadInputError("the store location is empty", fix="pass the store's directory or "
                            "s3://bucket/prefix, or leave --store out for $ADAPTERS_HOME")
    _check_store_path(None if root is None else Path(root))
    try:
        return Store.open(root, create=create)
    except OSError as err:
        action = "creating the store" if create else "opening the store"
        raise environment_error(err, action=action) from err


def ref_or_dir(text: str, root: str | Path | None) -> tuple[Store | None, str | Path]:
    """Open the store (if there is one) and apply the ref-or-directory rule to ``text``.

    The rule is :func:`registry.ref_or_dir.resolve_ref_or_dir`: a ref wins, a
    directory is written as a path (``./NAME``), a word that is both is refused.

    Args:
        text: A store ref, or a directory written as a path.
        root: ``--store``.

    Returns:
        ``(store or None when there is none, ref text or directory Path)``; the ref
        text is ``text`` itself (it resolved).

    Raises:
        BadInputError: Ambiguous (both a ref and a directory), or a bare directory name.
        NotFoundError: Neither a ref nor a directory, or a ref without a store.
    """
    from registry.errors import NotFoundError
    from registry.ref_or_dir import resolve_ref_or_dir

    try:
        st: Store | None = open_store(root)
    except NotFoundError:
        st = None
    target = resolve_ref_or_dir(st, text)
    return st, (target if isinstance(target, Path) else text)


def parse_value(text: str) -> Any:
    """JSON when it parses (``3``, ``1e-4``, ``true``, ``[1,2]``), else the string itself."""
    try:
        return loads_json(text)
    except ValueError:
        return text


def parse_pairs(items: list[str] | None, option: str, *, typed: bool = True) -> dict[str, Any]:
    """``["lr=1e-4", "epochs=3"]`` -> ``{"lr": 0.0001, "epochs": 3}``.

    Args:
        items: The repeated option's values.
        option: The option name, for the error message.
        typed: Parse values with :func:`parse_value`; else keep them as strings.

    Raises:
        BadInputError: An item has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInputError(
                f"{option} expects KEY=VALUE, got {shorten(item)}", fix=f"write e.g. {option} lr=1e-4"
            )
        out[key] = parse_value(value) if typed else value
    return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"10m"``, ``"1h"``, ``"2d"``, ``"1w"`` or plain seconds -> seconds.

    Raises:
        BadInputError: The text is not a non-negative number with an optional unit.
    """
    match = _DURATION.match(text.lower())
    if match is None:
        raise BadInputError(
            f"bad duration {shorten(text)}", fix="use a number with s, m, h, d or w, e.g. 30s, 10m, 1h, 2d"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def split_alias(target: str) -> tuple[str, str]:
    """``"name:alias"`` -> ``("name", "alias")``, both validated (names may hold one ``/``).

    Raises:
        BadInputError: Not of the form NAME:ALIAS, or an invalid name or alias.
    """
    from registry.storage.refs import parse_ref

    parsed = parse_ref(target) if ":" in target and "@" not in target else None
    if parsed is None or parsed.name is None or parsed.alias is None:
        raise BadInputError(
            f"expected NAME:ALIAS, got {shorten(target)}", fix="write e.g. my-adapter:candidate"
        )
    return parsed.name, parsed.alias
