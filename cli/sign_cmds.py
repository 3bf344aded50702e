"""Signing commands: ``keygen`` and ``sign`` (checking is ``verify --signatures``).

``adapters keygen PRIVATE.pem PUBLIC.pem`` writes an ed25519 key pair (PEM; the
private key 0600, never overwritten). ``adapters sign REF --key KEY.pem`` signs the
version's name and digest as a DSSE envelope (:mod:`registry.signing`) and stores it
beside the version (:meth:`registry.storage.store.Store.add_signature`, audited ``sign``).
Trust lives with whoever checks: ``adapters verify [REF|--all] --signatures
--trusted-keys KEY.pub`` (``cli/audit_cmds.py``) and ``promote``'s signature
requirement (:func:`registry.signing.require_signature`).

``cryptography`` is imported by the signing library only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOpt, StoreOpt, open_store
from cli.output import Output, escape


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
    from registry.signing import sign_version

    st = open_store(store)
    version = st.resolve(ref)
    envelope = sign_version(version.name, version.digest, key)
    stored = st.add_signature(version, envelope)
    keyid, blob = next(iter(stored.items()))
    data = {"ref": version.ref, "digest": version.digest, "keyid": keyid, "envelope": blob}

    def render(console: Any) -> None:
        console.print(f"signed {escape(version.ref)}")
        console.print(f"key {keyid}, envelope {blob}")

    Output(json_out).emit(data, render)
