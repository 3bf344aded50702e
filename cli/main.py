"""Entry point of the ``adapters`` command.

The typer app is assembled from one module per command group (registry, merge,
unload/quantize, gate/promote); each exposes ``register(app)``. Those modules
load torch and friends only inside the commands that need them, so
``adapters --help`` and every registry command start fast.

``main()`` runs the app outside click's standalone mode so that every
:class:`registry.errors.AdapterkitError` becomes one ``error:`` line, one ``fix:``
line and the documented exit code (JSON on stdout with ``--json``).
"""

from __future__ import annotations

import importlib
import json
import sys

import typer

try:  # typer >= 0.22 vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from registry.errors import EXIT_BAD_INPUT, AdapterkitError

COMMAND_MODULES: tuple[str, ...] = (
    "cli.registry_cmds",
    "cli.hub_cmds",
    "cli.sign_cmds",
    "cli.merge_cmds",
    "cli.unload_cmds",
    "cli.gate_cmds",
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


def _report(err: AdapterkitError, json_mode: bool) -> None:
    if json_mode:
        sys.stdout.write(json.dumps(err.to_json(), indent=2) + "\n")
        return
    sys.stderr.write(f"error: {err.message}\n")
    if err.fix:
        sys.stderr.write(f"fix: {err.fix}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code (see registry/errors.py)."""
    args = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in args
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="adapters", standalone_mode=False)
    except AdapterkitError as err:
        _report(err, json_mode)
        return err.exit_code
    except typer.Exit as done:
        return done.exit_code
    except ClickException as err:
        err.show()
        return EXIT_BAD_INPUT
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing half-written is visible\n")
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
