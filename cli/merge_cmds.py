"""``adapters merge``: merge stored adapters on their true deltas and push the result.

The command resolves each input ref in the store, refuses inputs trained on bases
of different structure (their records' base fingerprints;
``--allow-base-mismatch`` accepts the same structure with different weights, as
a lineage warning), materializes the inputs into a temporary directory under the
store's ``tmp/``, runs :func:`merging.engine.merge_adapters` module by module
under a progress bar, writes the PEFT directory, validates it with the same
ingest checks as ``push`` and pushes it with lineage: parents (digest, ref, role
``input``, weight), recipe (method, every parameter including defaults, seed,
rank, tool version; ``align`` when ``--align`` is given) and report (overall and
per-module relative Frobenius error, output ranks, warnings). Method parameters
(``--density``, ``--gamma``, ``--epsilon``, ``--align``, ...) are passed through
as given: their defaults, bounds and help text belong to the methods' registry
(:mod:`merging.methods`), which needs no torch to import. ``--out DIR`` also
writes the PEFT directory there (atomically). torch and the merge engine are
imported inside the command.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.common import AllowBaseMismatchOpt, JsonOpt, StoreOpt, open_store
from cli.output import Output, escape, make_table
from merging.methods import METHODS, PARAMETER_HELP  # imports no torch
from registry.errors import BadInputError, shorten

METHOD_NAMES = tuple(sorted(METHODS))


def register(app: typer.Typer) -> None:
    """Add ``merge`` to ``app``."""
    app.command("merge")(merge)


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``"0.5,0.5"`` -> ``[0.5, 0.5]`` (one per input).

    Raises:
        BadInputError: Not numbers, not finite, or not one per input.
    """
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"--weights expects comma-separated numbers, got {shorten(text)}",
                            fix="write e.g. --weights 0.5,0.5") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise BadInputError(f"--weights needs {count} finite numbers, got {shorten(text)}",
                            fix="give one weight per adapter, e.g. --weights 0.5,0.5")
    return weights


def parse_rank(text: str | None) -> int | str | None:
    """``"16"`` -> 16, ``"full"`` -> ``"full"``, None -> None.

    Raises:
        BadInputError: Anything else.
    """
    if text is None or text == "full":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise BadInputError(f"--rank must be a positive integer or 'full', got {shorten(text)}",
                        fix="write e.g. --rank 16")


def merge(
    refs: Annotated[list[str], typer.Argument(help="Two or more stored adapter refs.",
                                              show_default=False)],
    method: Annotated[str, typer.Option("--method", help=f"One of {', '.join(METHOD_NAMES)}.")]
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
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Merge adapters module by module on their true deltas (s·B·A) and push the result."""
    from registry.storage.refs import validate_name

    out = Output(json_out)
    if len(refs) < 2:
        raise BadInputError("merge needs at least two adapters", fix="adapters merge A B --method ties")
    given = {"density": density, "lambda": lam, "normalize": normalize or None,
             "sign_election": sign_election, "gamma": gamma, "epsilon": epsilon, "align": align}
    weight_list = parse_weights(weights, len(refs))
    rank_value = parse_rank(rank)
    st = open_store(store)
    versions = [st.resolve(ref) for ref in refs]
    target = name or f"{versions[0].name}-{method}" + (f"-{align}" if align else "")
    validate_name(target)

    from merging.engine import check_bases, merge_adapters, module_union
    from merging.methods import get_method
    from merging.peft_output import write_peft_dir
    from merging.publish import push_merge

    spec = get_method(method)
    spec.resolve({k: v for k, v in given.items() if v is not None}, weight_list or [1.0] * len(refs))
    labels = [f"{v.name}@{v.short}" for v in versions]
    base_warnings = check_bases([v.record.get("base_model") for v in versions], labels,
                                allow_weights_mismatch=allow_base_mismatch)
    (st.root / "tmp").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="merge-", dir=st.root / "tmp") as work:
        work_dir = Path(work)
        from merging.adapter import load_adapter

        adapters = [load_adapter(st.materialize(v, work_dir / f"input-{i}"))
                    for i, v in enumerate(versions)]
        with out.progress(f"merging ({method})", len(module_union(adapters)),
                          unit="modules") as advance:
            result = merge_adapters(adapters, weight_list, method, params=given, rank=rank_value,
                                    seed=seed, progress=advance, labels=labels)
        report = result.report
        warnings = base_warnings + report["warnings"]
        pushed = push_merge(st, versions, result, target, work_dir=work_dir, method=method,
                            warnings=base_warnings, allow_base_mismatch=allow_base_mismatch)
        written = str(write_peft_dir(result, out_dir)) if out_dir is not None else None
    _emit(out, pushed, report, warnings, written)


def _emit(out: Output, pushed: Any, report: dict[str, Any], warnings: list[str],
          written: str | None) -> None:
    modules = report["modules"]
    ranks = sorted({m["rank"] for m in modules.values()})
    data = {**pushed.to_json(), "method": report["method"], "parameters": report["parameters"],
            "weights": report["weights"], "seed": report["seed"], "rank": report["rank"],
            "output_ranks": ranks, "error": report["error"], "max_error": report["max_error"],
            "modules": modules, "warnings": warnings, "out": written}

    def render(console: Any) -> None:
        state = "pushed" if pushed.created else "already stored"
        console.print(f"{state}: {escape(pushed.version.ref)}")
        console.print(f"method {report['method']} {report['parameters']}, weights "
                      f"{report['weights']}, seed {report['seed']}, output rank "
                      f"{'/'.join(str(r) for r in ranks)}")
        console.print(f"relative Frobenius error: overall {report['error']:.3g}, "
                      f"worst module {report['max_error']:.3g} ({len(modules)} modules)")
        worst = sorted(modules.items(), key=lambda kv: -kv[1]["error"])[:5]
        if worst and report["max_error"] > 0:
            console.print(make_table("worst modules", ["module", "rank", "error"],
                                     [(escape(n), m["rank"], f"{m['error']:.3g}") for n, m in worst]))
        for warning in warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if written:
            console.print(f"written to {escape(written)}")

    out.emit(data, render)
