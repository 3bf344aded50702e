"""Entry point of the ``adapters`` command.

The typer app is assembled here, and only here, from one module per command
group: :data:`COMMAND_MODULES` names every one of them, in the order their commands
appear in ``adapters --help``, and each exposes ``register(app)`` adding its own
commands (no module registers another's, none patches another's sub-app). Shared
options (``--json``, ``--store``, ``--expect`` ...) live in :mod:`cli.common`. The
command modules load torch and friends only inside the commands that need them, so
``adapters --help`` and every registry command start fast.

``main()`` runs the app outside click's standalone mode and is the one error
boundary: whatever goes wrong becomes one ``error:`` line and one ``fix:`` line on
stderr (with ``--json``: one JSON object ``{"error", "message", "fix", "exit_code"}``
on stdout) and the documented exit code:

* an :class:`registry.errors.AdapterkitError` -> its own code (1-6);
* an :class:`OSError` (permission, read-only file system, disk full, I/O, network)
  or a storage-service error -> :class:`registry.errors.EnvironmentFailure`, exit 6;
* a click/typer usage error (unknown option, missing argument, bad choice) -> exit 2
  with ``fix: run `adapters COMMAND --help```;
* anything else is a bug -> ``error: internal error (Type: message)``, exit 70,
  never a traceback (``ADAPTERS_DEBUG=1`` re-raises it for developers).

Messages and fixes are printed with control characters escaped
(:func:`cli.output.escape_control`), so a label or path holding a newline or an ESC
sequence cannot forge a second line or repaint the terminal.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import typer

try:  # typer >= 0.22 vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    # the same classes under click's own name (mypy sees two distinct types)
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

from cli.common import check_nonempty, check_utf8
from cli.output import escape_control
from registry.errors import (EXIT_INTERRUPTED, AdapterkitError, BadInputError, EnvironmentFailure,
                             InterruptedByUser, UsageError, environment_error, internal_error,
                             out_of_memory_error)

DEBUG_ENV = "ADAPTERS_DEBUG"
"""Set to 1 to let an internal error's traceback through (for developers)."""

COMMAND_MODULES: tuple[str, ...] = (
    "cli.registry_cmds",
    "cli.alias_cmds",
    "cli.audit_cmds",
    "cli.hub_cmds",
    "cli.sign_cmds",
    "cli.merge_cmds",
    "cli.search_cmds",
    "cli.unload_cmds",
    "cli.gate_cmds",
    "cli.ui_cmds",
)

app = typer.Typer(
    name="adapters",
    help="Version, merge, gate and release LoRA/PEFT adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module_name in COMMAND_MODULES:
    importlib.import_module(_module_name).register(app)


def _report(err: AdapterkitError, json_mode: bool) -> int:
    """Print ``err`` (one ``error:`` + one ``fix:`` line, or one JSON object); its code."""
    try:
        if json_mode:
            sys.stdout.write(json.dumps(err.to_json(), indent=2) + "\n")
            sys.stdout.flush()
        else:
            lines = f"error: {escape_control(err.message)}\n"
            if err.fix:
                lines += f"fix: {escape_control(err.fix)}\n"
            sys.stderr.write(lines)
            sys.stderr.flush()
    except OSError:  # stdout/stderr closed (a pipe reader went away): the code still counts
        pass
    return err.exit_code


def _interrupted() -> InterruptedByUser:
    return InterruptedByUser("interrupted; nothing half-written is visible",
                             fix="run the command again (`adapters gc` collects what a store "
                                 "run left in its tmp/)")


def caused_by_interrupt(err: BaseException) -> bool:
    """Whether a Ctrl-C is behind ``err``: a library that catches ``KeyboardInterrupt`` in
    its own cleanup can fail there and raise something else (Optuna's ``tell`` raised
    ``UnboundLocalError``; SQLAlchemy a commit error), which read as a bug (exit 70) or a
    storage failure (exit 6) instead of the interrupt it was (exit 130)."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, KeyboardInterrupt):
            return True
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return False


def _usage_error(err: ClickException) -> UsageError:
    """A click usage error as exit 2, its fix naming the command's ``--help``."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "adapters"
    return UsageError(err.format_message(), fix=f"run `{command} --help`")


def _storage_service_error(err: Exception) -> EnvironmentFailure | None:
    """botocore's errors (endpoint down, credentials, access denied) as exit 6, else None."""
    module = type(err).__module__ or ""
    if not module.startswith(("botocore", "boto3", "s3transfer", "urllib3", "requests")):
        return None
    detail = " ".join(str(err).split())
    return EnvironmentFailure(f"storage service error ({type(err).__name__}: "
                              f"{detail or 'no message'})",
                              fix="check the network, the endpoint and the credentials, "
                                  "then retry")


def quiet_libraries() -> None:
    """Keep third-party chatter off a command's stderr (``--json`` callers parse it too).

    bitsandbytes logs, at import, that an optional CPU kernel package is missing, and
    transformers warns about its own deprecations when PEFT calls them: neither is about
    the user's input, and both landed between the one ``error:``/``fix:`` pair a failing
    command prints. Library users keep them (this runs for the CLI only). Cheap: nothing
    is imported.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\b")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code (see registry/errors.py).

    Never raises (except with ``$ADAPTERS_DEBUG`` set, for an internal error).
    """
    args = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    # a guess until the command's --json option is parsed (cli.common records the parsed
    # value here): options after `--` are values; eager options honour the guess
    state = {"json": "--json" in args[:args.index("--")] if "--" in args else "--json" in args}
    try:
        check_utf8(args)
        check_nonempty(args)
        command = typer.main.get_command(app)
        result = command.main(args=args, prog_name="adapters", standalone_mode=False, obj=state)
    except AdapterkitError as err:
        return _report(_interrupted() if caused_by_interrupt(err) else err, state["json"])
    except typer.Exit as done:
        return done.exit_code
    except NoArgsIsHelpError as err:  # `adapters` / `adapters alias` alone: the help, then
        if not state["json"]:             # the one error line every usage error ends with
            err.ctx.get_help()  # typer's rich formatter prints it to stdout (click's show()
                                # also wrote a stray line to stderr)
        group = " ".join(["adapters", *[a for a in args if not a.startswith("-")]])
        return _report(UsageError(f"missing command after `{group}`",
                                  fix=f"run `{group} --help`"), state["json"])
    except ClickException as err:  # usage errors: unknown option, missing argument...
        return _report(_usage_error(err), state["json"])
    except typer.Abort:
        return _report(BadInputError("aborted", fix="run the command again"), state["json"])
    except KeyboardInterrupt:
        return _report(_interrupted(), state["json"])
    except OSError as err:
        return _report(environment_error(err), state["json"])
    except Exception as err:  # noqa: BLE001 - the last resort: a bug, reported as one
        if caused_by_interrupt(err):
            return _report(_interrupted(), state["json"])
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        return _report(_storage_service_error(err) or out_of_memory_error(err)
                       or internal_error(err), state["json"])
    if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130), returned as is here
        return _report(_interrupted(), state["json"])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
