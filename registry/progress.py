"""The progress callback type every long registry operation accepts.

Hashing and copying report the number of bytes done per chunk, so a caller can drive
any progress bar (the CLI's rich bar, a web view) without the library knowing it.
Defined once here; the store, the fingerprint and the merge engine all take it.
A use case with several long stages (:func:`registry.add.add_adapter`: fingerprint,
then hash) takes a :class:`StageProgress` so each stage gets its own bar and total.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes (or units) completed since the last call."""


class StageProgress(Protocol):
    """Opens one progress display per stage of a longer operation (fingerprint, hash).

    Called with a plain-text description and the stage's total (None: unknown); the
    context manager yields the stage's :data:`ProgressCallback`. ``cli.output.Output.progress``
    is one; :func:`single_callback` adapts a lone callback.
    """

    def __call__(self, description: str,
                 total: int | None) -> AbstractContextManager[ProgressCallback]:
        """Open the display of one stage."""
        ...


def single_callback(callback: ProgressCallback | None) -> StageProgress:
    """A :class:`StageProgress` that feeds every stage into one callback (or nowhere)."""
    def stage(description: str, total: int | None) -> AbstractContextManager[ProgressCallback]:
        return nullcontext(callback if callback is not None else _ignore)
    return stage


def _ignore(done: int) -> None:
    """A progress callback for callers that show no progress."""
