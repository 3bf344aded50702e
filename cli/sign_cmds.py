"""Signing commands: ``keygen`` and ``sign`` (checking is ``verify --signatures``).

``adapters keygen PRIVATE.pem PUBLIC.pem`` writes an ed25519 key pair (PEM; the
private key 0600, never overwritten). ``adapters sign REF --key KEY.pem`` signs the
version's name and digest as a DSSE envelope and stores it beside the version,
audited ``sign`` (one call: :func:`registry.sign_stored.sign_stored_version`).
Trust lives with whoever checks: ``adapters verify [REF|--all] --signatures
--trusted-keys KEY.pub`` (``cli/audit_cmds.py``) and ``promote``'s signature
requirement (:func:`registry.signing.require_signature`).

``cryptography`` is imported by the signing library only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import JsonOpt, StoreOpt, open_store
from cli.output import Output, escape

if TYPE_CHECKING:
    from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add ``keygen`` and ``sign`` to ``app``."""
    app.command("keygen")(keygen)
    app.command("sign")(sign)


def keygen(
    private_key: Annotated[Path, typer.Argument(help="Private key PEM to write (mode 0600).")],
    public_key: Annotated[Path, typer.Argument(help="Public key PEM to write (share this one).")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Create an ed25519 signing key pair (never overwrites a file)."""
    from registry.signing import generate_key

    del store  # accepted like on every command; keys live outside the store
    keyid = generate_key(private_key, public_key)
    data = {"private_key": str(private_key), "public_key": str(public_key), "keyid": keyid}
    Output(json_out).emit(data, lambda c: c.print(
        f"key {keyid}\nprivate: {escape(str(private_key))} (keep secret)\n"
        f"public:  {escape(str(public_key))} (pass to --trusted-keys)"
    ))


def sign(
    ref: Annotated[str, typer.Argument(help="Version to sign (name, name@digest, name:alias...).")],
    key: Annotated[Path, typer.Option("--key", help="ed25519 private key PEM.")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Sign a version's name and digest and store the envelope beside it."""
    from registry.sign_stored import sign_stored_version

    signed = sign_stored_version(open_store(store), ref, key)

    def render(console: Console) -> None:
        console.print(f"signed {escape(signed.ref)}")
        console.print(f"key {signed.keyid}, envelope {signed.envelope}")

    Output(json_out).emit(signed.to_json(), render)
