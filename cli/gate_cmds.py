"""Gate and release commands: ``gate`` and ``promote``.

``adapters gate REF --base MODEL_DIR --policy gate.yaml [--junit report.xml] [--json]``
evaluates a registry version (or a PEFT directory) with :func:`gate.runner.run_gate`,
prints a table (or the result JSON), optionally writes JUnit XML, appends a Markdown
summary to ``$GITHUB_STEP_SUMMARY`` when set, and stores the result as a gate record
bound to (version digest, policy digest). Exit 0 when every check passes, 1 when one
fails, 2 for a bad policy, a missing file or other bad input. Without ``--policy`` the
store's pinned policy is used, else adapterkit's built-in default
(:mod:`gate.default_policy`; the run says so); ``adapters gate --print-default-policy``
prints the default as YAML.

``adapters promote REF --to release [--expect OLD] [--policy gate.yaml]
[--force --reason TEXT] [--trusted-keys KEY.pub]`` moves a protected alias after
checking for a passing gate record (and, with trusted keys, a valid signature):
one call of :func:`gate.promote.promote_configured`, which takes the store's
``config.json`` ``gate_policy`` without ``--policy``. Exit 1 (naming what is missing
or failed) when refused. (``alias history`` is :mod:`cli.alias_cmds`'s.)

torch, transformers and peft are imported only inside ``gate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cli.common import DeviceOpt, ExpectOpt, JsonOpt, StoreOpt, open_store, parse_expect, ref_or_dir
from cli.output import Output, escape, short_digest
from registry.errors import GateFailedError

if TYPE_CHECKING:
    from rich.console import Console

    from gate.results import CheckResult


def register(app: typer.Typer) -> None:
    """Add ``gate`` and ``promote`` to ``app``."""
    app.command("gate")(gate)
    app.command("promote")(promote)


def gate(
    ref: Annotated[str, typer.Argument(metavar="REF", help="Version to gate (any ref), or a PEFT directory written as a path (./DIR).")],
    base: Annotated[Path, typer.Option("--base", metavar="MODEL_DIR",
                                       help="Base model directory (weights + tokenizer).")],
    policy: Annotated[Optional[Path], typer.Option(
        "--policy", metavar="GATE_YAML", help="Gate policy (YAML); default: the store's pinned "
        "policy, else the built-in default.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="REPORT_XML",
                                                  help="Also write a JUnit XML report here.")] = None,
    no_record: Annotated[bool, typer.Option("--no-record",
                                            help="Do not store the result in the registry.")] = False,
    device: DeviceOpt = "auto",
    allow_outside_data: Annotated[bool, typer.Option(
        "--allow-outside-data", help="Let the policy read data files outside its own "
        "directory (refused by default: a policy is untrusted input).")] = False,
    model: Annotated[Optional[Path], typer.Option(
        "--model", metavar="DIR", help="Directory of a model recorded by reference (default: "
        "its recorded location); checked against the record first (exit 3 if it differs).")] = None,
    source: Annotated[Optional[Path], typer.Option(
        "--source", metavar="DIR", help="Directory of the model the candidate was made from "
        "(drift), when its recorded location is not at hand.")] = None,
    print_default_policy: Annotated[bool, typer.Option(
        "--print-default-policy", is_eager=True, callback=_print_default_policy,
        help="Print the built-in default policy as YAML and exit.")] = False,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Evaluate a candidate against a policy; exit 0 pass, 1 fail, 2 bad input, 3 integrity."""
    from gate.default_policy import gate_policy
    from gate.report import append_step_summary, check_junit_path, rich_table, write_junit
    from gate.runner import run_gate
    from merging.devices import resolve_device

    out = Output(json_out)
    if junit is not None:  # refused before anything is evaluated or recorded
        check_junit_path(junit)
    # the one ref-or-directory rule: a ref wins, a directory is written as a path
    # (./NAME), a word that is both is refused; st is None where there is no store
    st, candidate = ref_or_dir(ref, store)
    pol, default_used = gate_policy(st, policy, allow_outside_data=allow_outside_data)  # bad -> exit 2
    if default_used:
        out.info(f"no --policy given and none pinned: using the built-in default policy "
                 f"{short_digest(pol.digest)} (see adapters gate --print-default-policy)")
    if isinstance(candidate, Path) and st is None:
        out.info(f"gating directory {escape(str(candidate))} (not recorded in a registry)")
    colours = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow"}

    def on_check(check: CheckResult) -> None:
        out.info(f"[{colours.get(check.status, 'white')}]{check.status:>5}[/] {escape(check.name)}"
                 f" ({check.duration_s:.1f}s)")

    # after the policy (a hostile one is refused before torch is imported), before evaluating
    evaluate_on = str(resolve_device(device))
    result = run_gate(candidate, base, pol, store=st, record=not no_record, on_check=on_check,
                      device=evaluate_on, model_dir=model, source_dir=source)
    if junit is not None:
        write_junit(result, junit)
    append_step_summary(result)

    def render(console: Console) -> None:
        console.print(rich_table(result))
        console.print(f"candidate {escape(result.candidate)}  policy {short_digest(result.policy_digest)}"
                      + (" (built-in default)" if default_used else "")
                      + ("  (gate record stored)" if result.stored else ""))
        if junit is not None:
            console.print(f"JUnit report: {escape(str(junit))}")

    failed = None if result.passed else GateFailedError(
        f"gate failed: {len(result.failed)} of {len(result.checks)} checks did not pass "
        f"({', '.join(c.name for c in result.failed)})",
        fix="see the checks' messages; promotion needs a passing gate record")
    # a failing verdict's JSON also carries the error fields every failing command's has
    out.emit({**result.to_json(), "default_policy": default_used,
              **(failed.to_json() if failed else {})}, render)
    if failed is not None:
        if json_out:
            raise typer.Exit(failed.exit_code)
        raise failed


def _print_default_policy(ctx: typer.Context, value: bool) -> None:
    """``--print-default-policy``: print the built-in default policy's YAML (with ``--json``,
    ``{"digest", "yaml", "heldout"}``), exit 0."""
    if not value:
        return
    from gate.default_policy import HELDOUT_FILE, POLICY_FILE, default_digest, default_policy_yaml

    if (ctx.find_root().obj or {}).get("json"):
        Output(True).emit({"digest": default_digest(), "heldout": str(HELDOUT_FILE),
                           "yaml": POLICY_FILE.read_text(encoding="utf-8")})
    else:
        typer.echo(default_policy_yaml(), nl=False)
    raise typer.Exit(0)


def promote(
    ref: Annotated[str, typer.Argument(metavar="REF", help="Version to promote.")],
    to: Annotated[str, typer.Option("--to", metavar="ALIAS", help="Alias to move.")] = "release",
    expect: ExpectOpt = None,
    policy: Annotated[Optional[Path], typer.Option(
        "--policy", metavar="GATE_YAML", help="Policy the gate record must be under "
        "(default: the store's config.json gate_policy).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote without a passing gate record.")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why (required with --force; audited).")] = None,
    trusted_keys: Annotated[Optional[list[Path]], typer.Option(
        "--trusted-keys", metavar="KEY.pub", help="Also require a valid signature by one of these "
        "keys (repeatable; default: config.json trusted_keys).")] = None,
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Move a protected alias to REF if REF passed the gate under the configured policy."""
    from gate.promote import promote_configured, require_reason

    require_reason(force, reason)  # before the store is opened, as a usage error
    st = open_store(store)
    promotion = promote_configured(st, ref, to, policy_file=policy, expect=parse_expect(st, expect),
                                   force=force, reason=reason, trusted_key_paths=trusted_keys or [])
    result = promotion.result

    def render(console: Console) -> None:
        verb = "force-promoted" if result.forced else "promoted"
        old = short_digest(result.old) if result.old else "nothing"
        console.print(f"{verb} {escape(result.ref)} to {escape(result.name)}:{escape(result.alias)}"
                      f" (was {old})")
        if result.signed_by:
            console.print(f"signed by trusted key {result.signed_by[0]}")
        if result.custody:
            console.print(f"chain of custody gated: {escape(', '.join(result.custody))}")
        if result.forced:
            console.print(f"[yellow]forced[/yellow]: {escape(result.reason or '')} (recorded in the audit log)")

    Output(json_out).emit(promotion.to_json(), render)

