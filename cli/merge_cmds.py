"""``adapters merge``: merge stored adapters on their true deltas and push the result.

Parse, one call, render: the options become a
:class:`merging.lora.merge_versions.MergeRequest` (weights, rank and the method's
parameters are checked by the library, which owns their defaults, bounds and help
text: :mod:`merging.lora.methods` and :mod:`merging.lora.options` need no torch to
import), :func:`merging.lora.merge_versions.merge_versions` does the whole
merge-and-push under a progress bar, and its :class:`MergeReport` is rendered (the
``--json`` document is :meth:`MergeReport.to_json`). The merge module, and with it
torch, is imported inside the command.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from cli.common import AllowBaseMismatchOpt, DeviceOpt, JsonOpt, StoreOpt, open_store
from cli.output import Output, escape, make_table
from merging.lora.merge_versions import MergeRequest  # imports no torch
from merging.lora.methods import METHODS, PARAMETER_HELP  # imports no torch

if TYPE_CHECKING:
    from merging.lora.merge_versions import MergeReport


def register(app: typer.Typer) -> None:
    """Add ``merge`` to ``app``."""
    app.command("merge")(merge)


def merge(
    refs: Annotated[list[str], typer.Argument(help="Two or more stored adapter refs.",
                                              show_default=False)],
    method: Annotated[str, typer.Option("--method", help=f"One of {', '.join(sorted(METHODS))}.")]
    = "ties",
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="Comma-separated weights, one per input (default 1 each).")] = None,
    density: Annotated[Optional[float], typer.Option(
        "--density", help=PARAMETER_HELP["density"])] = None,
    lam: Annotated[Optional[float], typer.Option(
        "--lambda", help=PARAMETER_HELP["lambda"])] = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize", help=PARAMETER_HELP["normalize"])] = False,
    sign_election: Annotated[Optional[str], typer.Option(
        "--sign-election", help=PARAMETER_HELP["sign_election"])] = None,
    gamma: Annotated[Optional[float], typer.Option(
        "--gamma", help=PARAMETER_HELP["gamma"])] = None,
    epsilon: Annotated[Optional[float], typer.Option(
        "--epsilon", help=PARAMETER_HELP["epsilon"])] = None,
    align: Annotated[Optional[str], typer.Option(
        "--align", help=PARAMETER_HELP["align"], show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of DARE/DELLA masks and SVD sketches.")] = 0,
    rank: Annotated[Optional[str], typer.Option(
        "--rank", help="Output rank N, or 'full' (default: exact for linear/task_arithmetic/"
                       "cat and --align knots, else the largest input rank).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Name to push the result under (default: <first input>-<method>, "
                       "plus -<align> when aligned).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Also write the merged PEFT adapter directory here.")] = None,
    allow_base_mismatch: AllowBaseMismatchOpt = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Merge adapters module by module on their true deltas (s·B·A) and push the result."""
    out = Output(json_out)
    request = MergeRequest.parse(
        refs, method=method, weights=weights, rank=rank, seed=seed, name=name, out_dir=out_dir,
        allow_base_mismatch=allow_base_mismatch, device=device,
        params={"density": density, "lambda": lam, "normalize": normalize or None,
                "sign_election": sign_election, "gamma": gamma, "epsilon": epsilon,
                "align": align})
    st = open_store(store)
    from merging.lora.merge_versions import merge_versions

    report = merge_versions(st, request, progress=functools.partial(out.progress, unit="modules"))
    _emit(out, report)


def _emit(out: Output, report: MergeReport) -> None:
    data = report.to_json()
    pushed, merge, warnings, ranks = report.pushed, report.merge, report.warnings, report.output_ranks
    modules = merge["modules"]

    def render(console: Any) -> None:
        state = "pushed" if pushed.created else "already stored"
        console.print(f"{state}: {escape(pushed.version.ref)}")
        console.print(f"method {merge['method']} {merge['parameters']}, weights "
                      f"{merge['weights']}, seed {merge['seed']}, output rank "
                      f"{'/'.join(str(r) for r in ranks)}"
                      + ("" if merge["device"] == "cpu" else f", on {merge['device']}"))
        console.print(f"relative Frobenius error: overall {merge['error']:.3g}, "
                      f"worst module {merge['max_error']:.3g} ({len(modules)} modules)")
        worst = sorted(modules.items(), key=lambda kv: -kv[1]["error"])[:5]
        if worst and merge["max_error"] > 0:
            console.print(make_table("worst modules", ["module", "rank", "error"],
                                     [(escape(n), m["rank"], f"{m['error']:.3g}") for n, m in worst]))
        for warning in warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if report.out:
            console.print(f"written to {escape(report.out)}")

    out.emit(data, render)
