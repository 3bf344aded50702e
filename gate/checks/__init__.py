"""One small module per check kind; each exposes ``run(spec, ctx) -> Outcome``.

A check reads its validated parameters from ``spec`` (:class:`gate.policy.CheckSpec`)
and everything else (candidate, parents, release, cached models) from ``ctx``
(:class:`gate.context.GateContext`). It returns an :class:`Outcome`; the runner adds
the check's name, kind and duration and turns exceptions into ``error`` results, so
a check never has to guard against a broken candidate itself.

========================  =====================================================
kind                      module
========================  =====================================================
``structural``            :mod:`gate.checks.structural`
``merge_equivalence``     :mod:`gate.checks.merge_equivalence`
``perplexity``            :mod:`gate.checks.perplexity`
``retention``             :mod:`gate.checks.retention`
``generation``            :mod:`gate.checks.generation`
``drift``                 :mod:`gate.checks.drift`
========================  =====================================================
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gate.context import GateContext
    from gate.policy import CheckSpec


@dataclass(frozen=True)
class Outcome:
    """What a check found: ``status`` (pass/fail/skip/error), a one-line message,
    flat ``metrics`` and optional per-item ``details``."""

    status: str
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    details: Any = None


def passed(ok: bool, message: str, metrics: dict[str, Any] | None = None,
           details: Any = None) -> Outcome:
    """``pass`` when ``ok`` else ``fail``, with the same message/metrics/details."""
    return Outcome("pass" if ok else "fail", message, dict(metrics or {}), details)


def skip(message: str, metrics: dict[str, Any] | None = None) -> Outcome:
    return Outcome("skip", message, dict(metrics or {}))


def num(value: float | None, digits: int = 6) -> float | None:
    """Round for display and storage; NaN/inf become None (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


CheckFn = Callable[["CheckSpec", "GateContext"], Outcome]


def get_check(kind: str) -> CheckFn:
    """The ``run`` function of a check kind (imported on first use)."""
    module = importlib.import_module(f"gate.checks.{kind}")
    return module.run
