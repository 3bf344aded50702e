"""Hugging Face Hub commands: ``pull`` (Hub -> store) and ``push-hub`` (store -> Hub).

Thin wrappers over :mod:`registry.interop.hub`: parse options, call the library, render
through :class:`cli.output.Output`. ``pull`` takes the same ``--name``/``--alias``/
``--base`` options as ``push`` (a protected alias such as ``release`` is refused:
only ``promote`` moves it). Errors are :mod:`registry.errors` exceptions left to
``cli/main.py``. huggingface_hub is imported by the library only when a command
runs, so ``adapters --help`` does not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cli.common import JsonOpt, StoreOpt, open_store, parse_pairs
from cli.output import Output, escape

if TYPE_CHECKING:
    from rich.console import Console

TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", help="Hugging Face token (default: `hf auth login` / $HF_TOKEN).",
                 show_default=False),
]


def register(app: typer.Typer) -> None:
    """Add ``pull`` and ``push-hub`` to ``app``."""
    app.command("pull")(pull)
    app.command("push-hub")(push_hub)


def pull(
    source: Annotated[str, typer.Argument(help="hf://org/name or hf://org/name@revision.")],
    name: Annotated[
        Optional[str], typer.Option("--name", help="Name to bind (default: the repo id).")
    ] = None,
    alias: Annotated[Optional[str], typer.Option(help="Also point this alias at it.")] = None,
    base: Annotated[
        Optional[Path],
        typer.Option("--base", help="Local base model dir: fingerprint it and check A/B shapes."),
    ] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="Extra label k=v (repeat).")] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept a .bin adapter (loaded with weights_only=True).")
    ] = False,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Import an adapter from the Hugging Face Hub (or, offline, from the HF cache)."""
    from registry.interop import hub
    from registry.storage.aliases import check_new_alias, point_new_alias
    from registry.storage.refs import validate_name

    out = Output(json_out)
    ref = hub.parse_hub_ref(source)  # fail on a bad ref before opening anything
    st = open_store(store)
    validate_name(name or ref.repo_id)
    check_new_alias(st, alias, command="pull", name="NAME")
    labels = parse_pairs(label, "--label", typed=False)
    with out.progress(f"importing {ref.uri}", None) as advance:
        result = hub.pull(st, ref, name=name, base_dir=base, allow_pickle=allow_pickle,
                          token=token, labels=labels, progress=advance)
    version = result.push.version
    moved = point_new_alias(st, version, alias)
    data = {**result.to_json(), "alias": moved.to_json() if moved else None}

    def render(console: Console) -> None:
        state = "pulled" if result.push.created else "already stored (no new bytes)"
        console.print(f"{state}: {escape(version.ref)}")
        console.print(f"from: {escape(ref.uri)} (commit {result.snapshot.commit})")
        console.print(f"new bytes: {result.push.new_bytes}")
        if alias:
            console.print(f"{escape(version.name)}:{escape(alias)} -> {version.short}")

    out.emit(data, render)


def push_hub(
    ref: Annotated[str, typer.Argument(help="Version to upload (name, name@digest, name:alias).")],
    repo_id: Annotated[str, typer.Argument(help="Target Hub repo org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch to commit to (default: main).")
    ] = None,
    commit_message: Annotated[
        Optional[str], typer.Option("--commit-message", help="Hub commit message.")
    ] = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Upload a version to the Hub as a PEFT directory with a model card."""
    from registry.interop import hub

    out = Output(json_out)
    target = hub.parse_repo_id(repo_id)  # fail on bad input before opening anything
    hub.check_branch(revision)
    st = open_store(store)
    version = st.resolve(ref)  # a bad or unknown ref fails before anything is announced
    out.info(f"uploading {escape(version.ref)} to hf://{escape(target)}")
    result = hub.push_to_hub(st, version, target, private=private, revision=revision,
                             commit_message=commit_message, token=token)

    def render(console: Console) -> None:
        console.print(f"uploaded {escape(result.version.ref)} -> "
                      f"hf://{escape(result.repo_id)}@{escape(result.revision or 'main')}")
        console.print(f"commit: {escape(result.commit_url or result.commit)}")
        console.print(f"files: {escape(', '.join(result.files))}")

    out.emit(result.to_json(), render)
