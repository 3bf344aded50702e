"""Integrity and housekeeping commands: ``verify``, ``gc``, ``audit log|verify|checkpoint``.

``audit checkpoint --key KEY.pem --out FILE`` signs the log's newest entry
(:mod:`registry.audit.checkpoint`) for the auditor to keep outside the store;
``audit verify --checkpoint FILE --trusted-keys KEY.pub`` then also fails (exit 3)
when the log was rewritten or cut below that entry, even with every hash recomputed.

``verify`` and ``audit verify`` print their full report, then fail with exit 3
(:class:`registry.errors.IntegrityError`) when anything is wrong. ``verify
--signatures --trusted-keys KEY.pub`` also requires a valid signature by a trusted
key on every selected version: an unsigned version (or one signed only by untrusted
keys) and a forged or edited signature are integrity failures too (exit 3), because
``verify`` answers "can I trust these bytes"; ``promote`` refuses the same cases with
exit 1 (:func:`registry.signing.require_signature`). ``verify REF --model DIR`` checks a
deployed directory of a derived model against its record without rebuilding it
(:func:`registry.derived_check.check_model_dir`): exit 3 naming the first differing
tensor, exit 0 with one ``OK`` line. In ``--json``
mode the error goes into the one JSON document (key ``error``) instead of a
second one, so the output always parses.

Each command is parse, one library call, render: the documents and their errors
come from :mod:`registry.audit.report` (log, chain and checkpoint checks, signing a
checkpoint) and :mod:`registry.maintenance.verify_report` (what a failed ``verify`` says), which
the web view's ``/api/`` uses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from cli.common import JsonOpt, StoreOpt, open_store, parse_duration
from cli.output import Output, escape, make_table, short_digest
from registry.errors import AdapterkitError, BadInputError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from rich.console import Console

audit_app = typer.Typer(help="Read and check the hash-chained audit log.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``verify``, ``gc`` and ``audit`` to ``app``."""
    app.command("verify")(verify)
    app.command("gc")(gc)
    app.add_typer(audit_app, name="audit")


def emit_checked(out: Output, data: dict[str, Any], render: Callable[[Console], None],
                 error: AdapterkitError | None) -> None:
    """Emit a report; then raise ``error`` (human mode) or exit with its code (JSON mode).

    With ``--json`` a failing report carries the error object's fields at its top level
    (``error``: the type, ``message``, ``fix``, ``exit_code``), as every failing command's
    JSON does, beside the report's own fields.
    """
    if error is not None:
        data = {**data, **error.to_json()}
    out.emit(data, render)
    if error is None:
        return
    if out.json_mode:
        raise typer.Exit(error.exit_code)
    raise error


def trusted_keys_for(option: str, used: bool,
                     paths: list[Path] | None) -> dict[str, Ed25519PublicKey] | None:
    """The public keys ``--trusted-keys`` names, when ``option`` (which needs them) is
    ``used``; ``None`` when it is not.

    Raises:
        BadInputError: ``option`` without a trusted key, or trusted keys without ``option``.
    """
    if not used:
        if paths:
            raise BadInputError(f"--trusted-keys is only used with {option}",
                                fix=f"add {option}")
        return None
    from registry.signing import load_trusted_keys

    trusted = load_trusted_keys(paths or [])
    if not trusted:
        raise BadInputError(f"{option} needs at least one trusted public key",
                            fix="add --trusted-keys KEY.pub (a PEM file or a directory)")
    return trusted


def verify(
    ref: Annotated[Optional[str], typer.Argument(metavar="REF", help="Only this version.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every blob in the store.")] = False,
    signatures: Annotated[
        bool, typer.Option("--signatures", help="Also require a valid trusted signature.")
    ] = False,
    trusted_keys: Annotated[
        Optional[list[Path]],
        typer.Option("--trusted-keys", help="Trusted public key PEM file or directory (repeat)."),
    ] = None,
    model: Annotated[Optional[Path], typer.Option(
        "--model", metavar="DIR", help="Check a deployed model directory against REF's record "
        "(derived models: weights bit for bit, and config.json).")] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Re-hash stored blobs (and check signatures); exit 3 if anything is wrong."""
    from registry.maintenance.integrity import verify as verify_blobs
    from registry.maintenance.verify_report import verify_error

    if ref is not None and all_:
        raise BadInputError("give REF or --all, not both", fix="drop one of them")
    if model is not None:
        verify_model_dir(ref, model, signatures or all_, json_out, store)
        return
    trusted = trusted_keys_for("--signatures", signatures, trusted_keys)
    out = Output(json_out)
    st = open_store(store)
    with out.progress("verifying", None) as advance:
        report = verify_blobs(st, ref, progress=advance, trusted=trusted)
    data = report.to_json()

    def render(console: Console) -> None:
        for p in report.problems:
            console.print(f"[red]{p.kind}[/red] {p.digest} {escape(p.detail)}")
            for user in p.used_by:
                console.print(f"    used by {escape(user)}")
        signed = "" if report.signed is None else f", {report.signed} validly signed"
        console.print(f"checked {report.versions} version(s){signed}, {report.blobs} blob(s), "
                      f"{report.bytes} bytes: {len(report.problems)} problem(s)")

    emit_checked(out, data, render, verify_error(report))


def verify_model_dir(ref: str | None, model: Path, other: bool, json_out: bool,
                     store: str | Path | None) -> None:
    """``verify REF --model DIR``: DIR's weights are REF's, bit for bit (exit 3 naming the
    first differing tensor otherwise; :func:`registry.derived_check.check_model_dir`).

    Raises:
        BadInputError: No REF, or --all/--signatures given with --model.
    """
    from registry.derived_check import check_model_dir

    if ref is None or other:
        raise BadInputError("--model checks one directory against one version",
                            fix="adapters verify REF --model DIR (without --all/--signatures)")
    out = Output(json_out)
    st = open_store(store)
    version = st.resolve(ref)
    with out.progress(f"hashing {model.name}", None) as advance:
        check = check_model_dir(st, version, model, progress=advance)
    out.emit(check.to_json(), lambda console: console.print(
        f"OK: {escape(str(model))} is {escape(check.ref)} ({check.tensors} tensors, weights "
        f"{short_digest(check.weights_digest)})"))


def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
    grace: Annotated[
        str, typer.Option("--grace", help="Keep unreachable blobs younger than this (30s, 10m, 1h, 2d).")
    ] = "1h",
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Remove blobs that no version, lineage or gate record reaches."""
    from registry.maintenance.collection import gc as collect

    seconds = parse_duration(grace)
    report = collect(open_store(store), seconds, dry_run=dry_run)

    def render(console: Console) -> None:
        verb = "would remove" if dry_run else "removed"
        for digest in report.removed:
            console.print(f"{verb} {digest}")
        console.print(
            f"{verb} {len(report.removed)} blob(s), {report.freed_bytes} bytes, "
            f"{len(report.temp_removed)} temp file(s); kept {report.kept_reachable} reachable "
            f"and {len(report.kept_young)} unreachable blob(s) younger than {escape(grace)}"
        )

    Output(json_out).emit(report.to_json(), render)


@audit_app.command("log")
def audit_log(
    limit: Annotated[int, typer.Option("--limit", min=0, help="Newest N entries (0: all).")] = 20,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Show the newest audit entries."""
    from registry.audit.report import newest_entries

    entries = newest_entries(open_store(store), limit)

    def cell(value: Any) -> str:
        if isinstance(value, str) and value.startswith("sha256:"):
            return short_digest(value)
        if value is None or isinstance(value, str):
            return escape(value or "")
        return escape(json.dumps(value, sort_keys=True))

    rows = [
        (e["seq"], str(e["ts"])[:19], cell(e.get("actor")), cell(e["action"]),
         cell(e["subject"]), cell(e.get("old")), cell(e.get("new")))
        for e in entries
    ]
    Output(json_out).emit({"entries": entries}, lambda c: c.print(
        make_table(None, ["seq", "ts", "actor", "action", "subject", "old", "new"], rows)
    ))


@audit_app.command("verify")
def audit_verify(
    checkpoint: Annotated[Optional[list[Path]], typer.Option(
        "--checkpoint", help="A signed checkpoint file to check the log against (repeat).")] = None,
    trusted_keys: Annotated[Optional[list[Path]], typer.Option(
        "--trusted-keys", help="Public key PEM file or directory trusted to sign checkpoints.")
    ] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Check the hash chain (and signed checkpoints); exit 3 naming the first problem."""
    from registry.audit.report import audit_document, audit_error, problem_where

    trusted = trusted_keys_for("--checkpoint", bool(checkpoint), trusted_keys) or {}
    data = audit_document(open_store(store), checkpoint or [], trusted)

    def render(console: Console) -> None:
        for p in data["problems"]:
            console.print(f"[red]{problem_where(p)}[/red]: {escape(p['message'])}")
        for c in data.get("checkpoints", []):
            console.print(f"checkpoint {escape(c['file'])} (seq {c['seq']}): "
                          + ("[green]ok[/green]" if c["ok"] else "[red]failed[/red]"))
        console.print(f"{data['entries']} entries, {len(data['problems'])} problems")

    emit_checked(Output(json_out), data, render, audit_error(data))


@audit_app.command("checkpoint")
def audit_checkpoint(
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (PEM) to sign with.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the checkpoint (new file); "
                                                    "keep it outside the store.")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Sign the log's newest entry: an anchor `audit verify --checkpoint` checks against."""
    from registry.audit.report import refuse_existing, write_checkpoint

    refuse_existing(out)  # before the store is opened
    done = write_checkpoint(open_store(store), key, out)
    Output(json_out).emit(done.to_json(), lambda c: c.print(
        f"signed audit entry {done.seq} ({short_digest(done.hash)}) with key "
        f"{short_digest(done.keyid)} -> {escape(str(out))}"))
