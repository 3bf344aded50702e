"""One small module per check kind; each declares ``PARAMS`` and exposes ``run(spec, ctx)``.

Adding a check touches one file, as adding a merge method does::

    # gate/checks/my_check.py
    from gate import policy_fields as f
    from gate.check_kinds import CheckParams
    from gate.checks import Outcome

    PARAMS = CheckParams(listed=7, fields={"data": (f.path, f.REQUIRED),
                                           "max_x": (f.optional(f.number(0)), None)},
                         files=("data",), one_of=("max_x",))

    def run(spec, ctx) -> Outcome: ...

Every module of this package that declares ``PARAMS`` is a check kind named after the
module (found by :func:`gate.check_kinds.check_kinds`, imported once); :mod:`gate.policy` validates a
check's fields with its ``PARAMS`` (unknown fields are errors, defaults filled in,
data files resolved and hashed into the policy digest) and the runner calls its
``run``. The field checkers are :mod:`gate.policy_fields`, one small set for all.

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
    """The ``run`` function of a check kind.

    Raises:
        KeyError: An unknown kind (a validated policy holds none).
    """
    from gate.check_kinds import check_module

    return check_module(kind).run
