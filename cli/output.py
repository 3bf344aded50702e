"""One output sink for every command: rich tables for people, JSON for machines.

Commands build a JSON-able ``data`` object and, optionally, a renderer that draws
the same data for a terminal. ``--json`` prints ``data`` alone on stdout, so CI
can parse it; human output goes to stdout, progress bars and errors to stderr.

Strings from the store or the user (labels, names, base model ids, paths) may hold
control characters: an ESC sequence could repaint the terminal, a newline could
forge a second ``fix:`` line. The sink escapes them centrally, in three layers:

* :func:`escape` (what the commands wrap every untrusted value in, instead of
  ``rich.markup.escape``) escapes markup *and* every control character, newlines
  included, so an interpolated value is always one visible line;
* the consoles (:class:`SafeConsole`) escape every control character except the
  newlines of the command's own templates in every string they print, and every
  control character in the text of any other renderable (tables, trees), so a value
  that a command forgot to wrap still cannot emit ESC or CR;
* :func:`make_table` escapes every control character of each cell.

``\x1b`` is shown as the four characters ``\x1b`` (``\n``, ``\r``, ``\t`` likewise).
JSON output is left to :func:`json.dumps`, which escapes control characters itself,
so it stays exact.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.markup import escape as escape_markup
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.segment import Segment
from rich.table import Table

from registry.progress import ProgressCallback
from registry.text import escape_control

def escape(value: object) -> str:
    """An untrusted value for rich markup: control characters and markup escaped.

    Use it (not ``rich.markup.escape``) around every value from the store or the
    user interpolated into a line: the result is always one line, with no markup.
    """
    return escape_markup(escape_control(str(value)))


class _Sanitized:
    """A renderable whose text segments have their control characters escaped."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterable[Segment]:
        for segment in console.render(self.inner, options):
            if segment.control or not segment.text:
                yield segment
            else:
                yield Segment(escape_control(segment.text, keep_newlines=True), segment.style)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.inner)


class SafeConsole(Console):
    """A rich Console that never writes a control character it was handed.

    Strings keep their newlines (a command's own template may span lines) but lose
    every other control character; any other renderable (table, tree...) has every
    control character in its text escaped after layout.
    """

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: D102 - Console.print
        super().print(*(escape_control(o, keep_newlines=True) if isinstance(o, str)
                        else _Sanitized(o) if hasattr(o, "__rich_console__")
                        or hasattr(o, "__rich__") else o for o in objects), **kwargs)

    def out(self, *objects: Any, **kwargs: Any) -> None:  # noqa: D102 - Console.out
        super().out(*(escape_control(str(o), keep_newlines=True) for o in objects), **kwargs)


class Output:
    """Renders a command's result either as rich text or as JSON.

    Args:
        json_mode: Print machine-readable JSON instead of tables.
    """

    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.console = SafeConsole(highlight=False, soft_wrap=True)
        self.err_console = SafeConsole(stderr=True, highlight=False)

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

    @contextlib.contextmanager
    def progress(
        self, description: str, total: int | None, *, unit: str = "bytes"
    ) -> Iterator[ProgressCallback]:
        """A progress bar on stderr; yields a callback taking the units just done.

        Hidden in JSON mode and when stderr is not a terminal, so logs stay clean.
        ``description`` is plain text (names and paths are escaped here).
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
            # the live display bypasses print(): escape the plain-text description here
            task = bar.add_task(escape(description), total=total)
            yield lambda n: bar.advance(task, n)


def make_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """Build a rich table with one column per name and ``str()`` of every cell.

    Control characters in the title and cells are escaped (a cell is one line);
    markup in cells is the caller's: wrap untrusted values in :func:`escape`.
    """
    table = Table(title=None if title is None else escape_control(title),
                  title_justify="left")
    for column in columns:
        table.add_column(escape_control(column))
    for row in rows:
        table.add_row(*("" if cell is None else escape_control(str(cell)) for cell in row))
    return table


def short_digest(digest: str, length: int = 12) -> str:
    """``sha256:abcdef...`` -> ``abcdef123456`` for display."""
    return digest.split(":", 1)[-1][:length]
