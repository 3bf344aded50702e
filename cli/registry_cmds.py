"""Registry commands: init, push, ls, show, diff, fingerprint, export.

Each command parses its options, calls the registry library and renders the
result through :class:`cli.output.Output` (rich for people, ``--json`` for
machines). Errors are the library's :mod:`registry.errors` exceptions, left to
``cli/main.py`` to report. The registry modules are imported inside the commands,
so ``adapters --help`` pays only for typer and rich; nothing here imports torch
(only ``push --allow-pickle`` does, inside the ingest library).

The alias/lineage commands (``cli/alias_cmds.py``) and the verify/gc/audit
commands (``cli/audit_cmds.py``) are registered by ``cli/main.py`` like this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from cli.common import JsonOpt, StoreOpt, open_store, parse_pairs
from cli.output import Output, escape, make_table, short_digest
from registry.diff import flatten
from registry.errors import BadInputError, UsageError, shorten

if TYPE_CHECKING:
    from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add the registry commands to ``app``."""
    app.command("init")(init)
    app.command("push")(push)
    app.command("ls")(ls)
    app.command("show")(show)
    app.command("diff")(diff)
    app.command("fingerprint")(fingerprint)
    app.command("export")(export)
    app.command("delete")(delete)


def init(
    location: Annotated[Optional[str], typer.Argument(
        metavar="[STORE]", help="Store directory or s3://bucket/prefix (same as --store).",
        show_default=False)] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Create an empty store (idempotent): `adapters init [DIR | s3://bucket/prefix]`."""
    st = open_store(_init_location(location, store), create=True)
    data = {"root": st.location}
    Output(json_out).emit(data, lambda c: c.print(f"store ready at {escape(st.location)}"))


def _init_location(location: str | None, store: str | Path | None) -> str | Path | None:
    """The store ``init`` creates: the argument, else ``--store``, else the default.

    Raises:
        UsageError: Both are given and name different stores.
    """
    if location is None or store is None:
        return location if location is not None else store
    if Path(location) != Path(store):  # Path normalises s3:// to s3:/ on both sides
        raise UsageError(f"init got two different stores: {shorten(location)} and --store "
                         f"{shorten(str(store))}", fix="pass the store once, e.g. "
                         "`adapters init s3://bucket/prefix`")
    return location


def push(
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT adapter directory.")],
    name: Annotated[str, typer.Option("--name", help="Name to bind the version to.")],
    alias: Annotated[Optional[str], typer.Option(help="Also point this alias at it.")] = None,
    base: Annotated[
        Optional[Path],
        typer.Option("--base", help="Local base model dir: fingerprint it and check A/B shapes."),
    ] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Base model id.")] = None,
    base_revision: Annotated[Optional[str], typer.Option(help="Base model revision.")] = None,
    dataset_version: Annotated[Optional[str], typer.Option(help="Training data version.")] = None,
    dataset_digest: Annotated[Optional[str], typer.Option(help="Training data digest.")] = None,
    hparam: Annotated[Optional[list[str]], typer.Option(help="Hyperparameter k=v (repeat).")] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="Metric k=v (repeat).")] = None,
    risk: Annotated[Optional[list[str]], typer.Option(help="Known risk (repeat).")] = None,
    license: Annotated[Optional[str], typer.Option(help="License id.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="Free-form label k=v (repeat).")] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept a .bin adapter (loaded with weights_only=True).")
    ] = False,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Store an adapter directory as a new version of NAME (deduplicated)."""
    from registry.add import AdapterMetadata, add_adapter
    from registry.storage.aliases import check_new_alias, point_new_alias
    from registry.storage.refs import validate_name

    out = Output(json_out)
    st = open_store(store)
    validate_name(name)  # fail before hashing anything
    check_new_alias(st, alias, command="push", name=name)
    hyperparameters = parse_pairs(hparam, "--hparam")
    metrics = parse_pairs(metric, "--metric")
    labels = parse_pairs(label, "--label", typed=False)
    dataset = None
    if dataset_version is not None or dataset_digest is not None:
        dataset = {"version": dataset_version, "digest": dataset_digest}
    metadata = AdapterMetadata(
        base_model=base_model, base_revision=base_revision, dataset=dataset,
        hyperparameters=hyperparameters, metrics=metrics, known_risks=risk, license=license,
        labels=labels,
    )
    result = add_adapter(st, adapter_dir, name, metadata=metadata, base_dir=base,
                         allow_pickle=allow_pickle, progress=out.progress)
    version = result.version
    moved = point_new_alias(st, version, alias)
    data = {**result.to_json(), "alias": moved.to_json() if moved else None}

    def render(console: Console) -> None:
        state = "pushed" if result.push.created else "already stored (no new bytes)"
        console.print(f"{state}: {escape(version.ref)}")
        console.print(f"new bytes: {result.push.new_bytes}")
        if alias:
            console.print(f"{escape(version.name)}:{escape(alias)} -> {version.short}")

    out.emit(data, render)


def ls(
    name: Annotated[Optional[str], typer.Argument(help="Only this name.")] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """List names, their versions (newest first) and aliases."""
    from registry.version_documents import ls_document

    data = ls_document(open_store(store), name)
    entries = data["names"]

    def render(console: Console) -> None:
        rows = [
            (escape(e["name"]), short_digest(v["digest"]), v["created"], v["size"],
             escape(", ".join(v["aliases"])))
            for e in entries
            for v in e["versions"]
        ]
        console.print(make_table(None, ["name", "version", "created", "bytes", "aliases"], rows))

    Output(json_out).emit(data, render)


def _text(value: Any) -> str:
    """One cell: strings as they are, everything else as compact JSON, escaped for rich."""
    if value is None:
        return ""
    return escape(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def show(
    ref: Annotated[str, typer.Argument(help="name, name@digest, name:alias or sha256:...")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Show a version: record, files, aliases and lineage summary."""
    from registry.version_documents import show_document

    data = show_document(open_store(store), ref)

    def render(console: Console) -> None:
        console.print(f"[bold]{escape(data['ref'])}[/bold]  {data['kind']}, created {data['created']}")
        if data["aliases"]:
            console.print(f"aliases: {escape(', '.join(data['aliases']))}")
        fields = [(escape(k), _text(val)) for k, val in flatten(data["record"]).items()]
        console.print(make_table("record", ["field", "value"], fields))
        files = [(escape(f["path"]), short_digest(f["digest"]), f["size"]) for f in data["files"]]
        console.print(make_table("files", ["path", "digest", "bytes"], files))
        info = data["lineage"]
        if info["recipe"]:
            console.print(f"made by: {escape(str(info['recipe'].get('method')))}")
        for p in info["parents"]:
            console.print(f"  parent {escape(p.get('ref') or p['digest'])} "
                          f"role={escape(str(p.get('role')))} weight={p.get('weight')}")
        for child in info["children"] or ():
            console.print(f"  child {escape(child)}")
        if info.get("children_problem"):
            console.print(f"  [red]children not listed[/red]: {escape(info['children_problem'])}")

    Output(json_out).emit(data, render)


def diff(
    ref_a: Annotated[str, typer.Argument(metavar="REF1")],
    ref_b: Annotated[str, typer.Argument(metavar="REF2")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Show record and file differences between two versions."""
    from registry.diff import diff_versions

    data = diff_versions(open_store(store), ref_a, ref_b)
    record, files = data["record"], data["files"]

    def render(console: Console) -> None:
        console.print(f"a: {escape(data['a'])}\nb: {escape(data['b'])}")
        if data["same"]:
            console.print("identical versions")
            return
        field_rows = [(escape(d["key"]), _text(d["a"]), _text(d["b"])) for d in record]
        console.print(make_table("record", ["field", "a", "b"], field_rows))
        file_rows = [(escape(f["path"]), f["status"], short_digest(f["a"] or ""),
                      short_digest(f["b"] or "")) for f in files]
        console.print(make_table("files", ["path", "status", "a", "b"], file_rows))

    Output(json_out).emit(data, render)


def fingerprint(
    model_dir: Annotated[Path, typer.Argument(help="Local model dir (safetensors, sharded ok).")],
    no_weights: Annotated[
        bool, typer.Option("--no-weights", help="Headers only: skip weights_digest.")
    ] = False,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Print a base model's struct_digest and weights_digest (no store needed)."""
    from registry.formats.fingerprint import fingerprint_model, model_weights

    del store  # accepted like on every command; fingerprinting reads only MODEL_DIR
    out = Output(json_out)
    total = None if no_weights else model_weights(model_dir).total_bytes
    with out.progress(f"hashing {model_dir.name}", total) as advance:
        fp = fingerprint_model(model_dir, weights=not no_weights, progress=advance)
    data = {"model_dir": str(model_dir), "struct_digest": fp.struct_digest,
            "weights_digest": fp.weights_digest}
    out.emit(data, lambda c: c.print(
        f"struct_digest:  {fp.struct_digest}\nweights_digest: {fp.weights_digest or '-'}"
    ))


def export(
    ref: Annotated[str, typer.Argument(help="Version to export.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (must not exist or be empty).")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Write a plain PEFT directory (+ model card) that PeftModel.from_pretrained loads."""
    from registry.export import export as export_version

    out = Output(json_out)
    st = open_store(store)
    version = st.resolve(ref)
    with out.progress(f"exporting {version.name}", version.size) as advance:
        result = export_version(st, version, out_dir, progress=advance)
    out.emit(result.to_json(), lambda c: c.print(
        f"exported {escape(result.version.ref)} to {escape(str(result.path))}"
    ))


def delete(
    ref: Annotated[str, typer.Argument(
        metavar="NAME@DIGEST", help="The version to unbind, by digest (a name or alias could pick "
        "another one).")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Unbind a version from its name (audited); `adapters gc` then frees its blobs."""
    if "@" not in ref:
        raise BadInputError(f"delete takes NAME@sha256:..., got {shorten(ref)}",
                            fix="find the digest with `adapters ls` or `adapters show NAME`")
    version = open_store(store).delete_version(ref)
    data = {"deleted": version.ref, "name": version.name, "digest": version.digest}
    Output(json_out).emit(data, lambda c: c.print(
        f"deleted {escape(version.ref)} (`adapters gc` frees its blobs; lineage keeps its manifest)"))
