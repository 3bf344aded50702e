"""``adapters merge-search``: search merge recipes under the gate policy, push the pick.

Parses the flags into :class:`gate.search.run.SearchSettings`, runs
:func:`gate.search.run.run_search` (one worker: several processes naming the same
``--storage`` and ``--study`` share the work), prints a line per trial on stderr, then a
rich table of the Pareto front (every objective, feasibility, the pick marked) or the
whole result as ``--json``. Exit codes: 0 when a pick was found (and pushed, unless
``--no-push``) or this worker left the study to another; 1 when the study is full and
no trial passes the policy's checks (nothing is pushed); 2 bad input. torch, optuna and
the search package's heavy parts are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.common import AllowBaseMismatchOpt, DeviceOpt, JsonOpt, StoreOpt, open_store
from cli.output import Output, escape, make_table
from registry.errors import BadInputError, GateFailedError


def register(app: typer.Typer) -> None:
    """Add ``merge-search`` to ``app``."""
    app.command("merge-search")(merge_search)


def merge_search(
    refs: Annotated[list[str], typer.Argument(help="Two or more stored adapter refs.",
                                              show_default=False)],
    base: Annotated[Path, typer.Option("--base", help="Base model directory.")],
    policy: Annotated[Path, typer.Option("--policy", help="Gate policy YAML (objectives and "
                                                          "constraints come from its checks).")],
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated methods to search (default: ties,dare_ties,"
                          "breadcrumbs_ties,della,task_arithmetic).")] = None,
    trials: Annotated[int, typer.Option("--trials", help="COMPLETE trials in the study (shared by "
                                                         "all workers).")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed and merge seed.")] = 0,
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Optuna RDB URL shared by workers, e.g. sqlite:///study.db "
                          "(default: in memory).")] = None,
    study: Annotated[Optional[str], typer.Option(
        "--study", help="Study name (default: derived from inputs, policy, space and seed).")] = None,
    device: DeviceOpt = "auto",
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Name to push the pick under (default: <first input>-search).")] = None,
    space: Annotated[Optional[Path], typer.Option(
        "--space", help="YAML overriding the search space's ranges and choices.")] = None,
    pick_rule: Annotated[str, typer.Option(
        "--pick", help="min_retention (default) | perplexity | retention:<set> | trial:<n>.")]
    = "min_retention",
    sampler: Annotated[str, typer.Option("--sampler", help="tpe (default) | nsga2.")] = "tpe",
    heartbeat: Annotated[int, typer.Option(
        "--heartbeat", help="Seconds between worker heartbeats with --storage (a trial whose "
                            "worker is silent for 2x this is marked failed).")] = 30,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG of the front here (needs matplotlib).")] = None,
    no_push: Annotated[bool, typer.Option("--no-push", help="Report the pick, push nothing.")]
    = False,
    allow_base_mismatch: AllowBaseMismatchOpt = False,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Search merge recipes that pass the gate policy (Optuna), and push the best one."""
    from gate.search.run import SearchSettings, run_search
    from merging.devices import resolve_device

    out = Output(json_out)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if methods is not None and not method_list:
        raise BadInputError("--methods is empty", fix="e.g. --methods ties,dare_ties")
    settings = SearchSettings(methods=method_list, trials=trials, seed=seed, storage=storage,
                              study=study, device=str(resolve_device(device)), name=name, space_file=space,
                              pick_rule=pick_rule, sampler=sampler, heartbeat=heartbeat, plot=plot,
                              push=not no_push, allow_base_mismatch=allow_base_mismatch)
    st = open_store(store)

    def on_trial(row: Any) -> None:
        values = "  ".join(f"{k} {v:.4g}" for k, v in row.values.items())
        if row.refused:
            out.info(f"trial {row.number:>3} {escape(row.label):<22} [red]refused[/]  {escape(row.refused)}")
            return
        state = "[green]pass[/]" if row.feasible else "[red]fail[/]"
        out.info(f"trial {row.number:>3} {escape(row.label):<22} {state}  {escape(values)}")

    result = run_search(st, refs, base, policy, settings, on_trial=on_trial)
    failed = None
    if result.complete and result.picked is None:
        failed = GateFailedError(f"no trial of {len(result.rows)} passes the policy's checks; "
                                 "nothing pushed",
                                 fix="widen the space (--space), add methods or trials, or relax the policy")
    _emit(out, result, failed)
    if failed is not None:
        if json_out:  # the document above says it, error fields included: one JSON document
            raise typer.Exit(failed.exit_code)
        raise failed


def _cells(row: Any, objectives: list[Any], picked: Any) -> list[str]:
    params = {k: v for k, v in row.parameters.items() if k != "normalize"}
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in params.items())
    cells = [f"{row.number}" + (" *" if picked is not None and row.number == picked.number else ""),
             escape(row.label), ", ".join(f"{w:.2f}" for w in row.weights), escape(shown)]
    cells += [f"{row.values[o.name]:.4g}" for o in objectives]
    cells.append("pass" if row.feasible else "refused" if row.refused else "fail")
    return cells


def _emit(out: Output, result: Any, failed: GateFailedError | None = None) -> None:
    def render(console: Any) -> None:
        objectives = list(result.objectives)
        header = ["trial", "method", "weights", "parameters",
                  *[f"{escape(o.name)} ({'max' if o.direction == 'maximize' else 'min'})" for o in objectives],
                  "policy"]
        console.print(make_table(f"Pareto front of {escape(result.study)} ({len(result.rows)} trials, "
                                 f"{result.sampler} seed {result.seed})", header,
                                 [_cells(r, objectives, result.picked) for r in result.front]))
        if result.picked is not None:
            console.print(f"pick (--pick rule, * above): trial {result.picked.number} "
                          f"{escape(result.picked.label)}")
        elif result.complete:
            console.print("[red]no trial passes the policy[/red]: nothing picked")
        if result.pushed is not None:
            state = "pushed" if result.pushed.created else "already stored"
            console.print(f"{state}: {escape(result.pushed.version.ref)}  (gate it: adapters gate "
                          f"{escape(result.pushed.version.ref)} --base ... --policy ...)")
        if result.plot:
            console.print(f"plot: {escape(result.plot)}")
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}")

    # a failed search's JSON carries the error fields every failing command's has
    out.emit({**result.to_json(), **(failed.to_json() if failed else {})}, render)
