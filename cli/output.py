"""One output sink for every command: rich tables for people, JSON for machines.

Commands build a JSON-able ``data`` object and, optionally, a renderer that draws
the same data for a terminal. ``--json`` prints ``data`` alone on stdout, so CI
can parse it; human output goes to stdout, progress bars and errors to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

ProgressCallback = Callable[[int], None]
"""Called with the number of units (bytes, modules) just processed."""


class Output:
    """Renders a command's result either as rich text or as JSON.

    Args:
        json_mode: Print machine-readable JSON instead of tables.
    """

    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.console = Console(highlight=False, soft_wrap=True)
        self.err_console = Console(stderr=True, highlight=False)

    def emit(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        """Print ``data`` as JSON in JSON mode, else call ``render`` (or pretty-print)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.console)
        else:
            self.console.print_json(json.dumps(data, default=str))

    def info(self, message: str) -> None:
        """A status line for people; silent in JSON mode (goes to stderr)."""
        if not self.json_mode:
            self.err_console.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr, shown in both modes."""
        self.err_console.print(f"[yellow]warning:[/yellow] {message}")

    @contextlib.contextmanager
    def progress(
        self, description: str, total: int | None, *, unit: str = "bytes"
    ) -> Iterator[ProgressCallback]:
        """A progress bar on stderr; yields a callback taking the units just done.

        Hidden in JSON mode and when stderr is not a terminal, so logs stay clean.
        """
        if self.json_mode or not self.err_console.is_terminal:
            yield lambda _n: None
            return
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [TaskProgressColumn()]
        columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.err_console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)


def make_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """Build a rich table with one column per name and ``str()`` of every cell."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    return table


def short_digest(digest: str, length: int = 12) -> str:
    """``sha256:abcdef...`` -> ``abcdef123456`` for display."""
    return digest.split(":", 1)[-1][:length]
