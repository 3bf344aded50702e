"""The search's result: trial rows, the Pareto front, the pick, and a plot.

A :class:`TrialRow` is one COMPLETE trial: its merge (method, weights, every method
parameter with defaults filled, as the merge's lineage records it), objective values,
constraint values and feasibility. The **front** is the set of feasible trials no other
feasible trial dominates (at least as good on every objective, better on one); when no
trial is feasible it is the front of all trials, shown so that one sees how far off
the policy is, and nothing is picked.

**Pick rules** (``--pick``), always among feasible trials, ties broken by the next
criterion and then by the lower trial number (so the pick is deterministic):

* ``min_retention`` (default): the best worst-case retention (the smallest of the
  ``retention:*`` objectives), then the lower perplexity;
* ``perplexity``: the lowest perplexity (first perplexity objective), then the best
  worst-case retention;
* ``retention:<set>``: the best retention on that set, then worst-case retention;
* ``trial:<n>``: trial number ``n`` (it must be feasible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gate.search.scoring import BAD
from registry.errors import BadInputError, shorten

PICK_RULES = ("min_retention", "perplexity", "retention:<set>", "trial:<n>")


@dataclass(frozen=True)
class TrialRow:
    """One finished trial (see module docstring)."""

    number: int
    method: str
    weights: tuple[float, ...]
    parameters: dict[str, Any]
    values: dict[str, float]
    constraints: tuple[float, ...]
    checks: dict[str, Any]
    refused: str | None = None
    """Why the engine refused this trial's merge (its values overflow), if it did."""

    @property
    def feasible(self) -> bool:
        return self.refused is None and all(c <= 0 for c in self.constraints)

    @property
    def label(self) -> str:
        """``ties`` or ``ties+knots``."""
        align = self.parameters.get("align")
        return f"{self.method}+{align}" if align else self.method

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "method": self.method, "weights": list(self.weights),
                "parameters": self.parameters, "values": self.values,
                "constraints": list(self.constraints), "feasible": self.feasible,
                "checks": self.checks, "refused": self.refused}


def worst_retention(row: TrialRow) -> float:
    """The smallest retention objective (``-inf`` when there is none)."""
    values = [v for k, v in row.values.items() if k.startswith("retention:")]
    return min(values) if values else float("-inf")


def perplexity(row: TrialRow) -> float:
    """The first perplexity objective (``inf`` when there is none)."""
    values = [v for k, v in row.values.items() if k.startswith("perplexity:")]
    return values[0] if values else float("inf")


def _dominates(a: TrialRow, b: TrialRow, directions: dict[str, str]) -> bool:
    better = False
    for name, direction in directions.items():
        x, y = a.values[name], b.values[name]
        if direction == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(rows: Sequence[TrialRow], directions: dict[str, str]) -> list[TrialRow]:
    """Non-dominated feasible rows (all rows when none is feasible), by trial number."""
    pool = [r for r in rows if r.feasible] or list(rows)
    return sorted((r for r in pool if not any(_dominates(o, r, directions) for o in pool)),
                  key=lambda r: r.number)


def check_rule(rule: str) -> None:
    """Refuse an unknown ``--pick`` rule before any work is done.

    Raises:
        BadInputError: Not one of :data:`PICK_RULES`.
    """
    if rule in ("min_retention", "perplexity") or (rule.startswith("retention:") and len(rule) > 10) \
            or (rule.startswith("trial:") and _is_number(rule[6:])):
        return
    raise BadInputError(f"unknown --pick rule {shorten(rule)}",
                        fix=f"use one of {', '.join(PICK_RULES)}")


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²`` and other digits ``int`` refuses."""
    return text.isascii() and text.isdigit()


def pick(rows: Sequence[TrialRow], rule: str = "min_retention") -> TrialRow | None:
    """The picked feasible trial under ``rule`` (None when no trial is feasible).

    Raises:
        BadInputError: Unknown rule, unknown set, or ``trial:<n>`` not a feasible trial.
    """
    feasible = [r for r in rows if r.feasible]
    if rule == "min_retention":
        def key(r: TrialRow) -> tuple[float, ...]:
            return (-worst_retention(r), perplexity(r), r.number)
    elif rule == "perplexity":
        def key(r: TrialRow) -> tuple[float, ...]:
            return (perplexity(r), -worst_retention(r), r.number)
    elif rule.startswith("retention:"):
        name = rule
        if rows and name not in rows[0].values:
            known = ", ".join(k for k in rows[0].values if k.startswith("retention:"))
            raise BadInputError(f"--pick {shorten(rule)}: no such objective", fix=f"use one of {known}")
        def key(r: TrialRow) -> tuple[float, ...]:
            return (-r.values.get(name, float("-inf")), -worst_retention(r), r.number)
    elif rule.startswith("trial:") and _is_number(rule[6:]):
        number = int(rule[6:])
        found = [r for r in rows if r.number == number]
        if not found or not found[0].feasible:
            raise BadInputError(f"--pick {rule}: trial {number} is not a feasible finished trial",
                                fix="pick a trial marked feasible in the table")
        return found[0]
    else:
        raise BadInputError(f"unknown --pick rule {shorten(rule)}",
                            fix=f"use one of {', '.join(PICK_RULES)}")
    return min(feasible, key=key) if feasible else None


def _axis(rows: Sequence[TrialRow], prefix: str) -> bool:
    return any(k.startswith(prefix) for r in rows for k in r.values)


def plot_front(rows: Sequence[TrialRow], front: Sequence[TrialRow], picked: TrialRow | None,
               path: Path) -> str | None:
    """Write a PNG of the trials, the front and the pick; returns a note if it could not.

    Axes: held-out perplexity (x) against worst-case retention (y); a policy without a
    perplexity (retention) objective puts the trial number on that axis instead. Trials
    whose perplexity was not finite (scored :data:`gate.search.scoring.BAD`) are left
    out of the picture (they fail the policy) and counted in the title.

    Returns:
        None when the PNG was written, else why not (matplotlib missing, unwritable path).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, whatever the user's default backend
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot written (pip install matplotlib)"
    x_of = perplexity if _axis(rows, "perplexity:") else (lambda r: float(r.number))
    y_of = worst_retention if _axis(rows, "retention:") else (lambda r: float(r.number))
    shown = [r for r in rows if math.isfinite(x_of(r)) and x_of(r) < BAD
             and math.isfinite(y_of(r))]
    fig, ax = plt.subplots(figsize=(7, 5))
    for feasible, colour, label in ((False, "#bbbbbb", "fails the policy"), (True, "#4c72b0", "passes")):
        pts = [r for r in shown if r.feasible == feasible]
        ax.scatter([x_of(r) for r in pts], [y_of(r) for r in pts], c=colour, label=label, s=24)
    ordered = sorted((r for r in front if r in shown), key=x_of)
    ax.plot([x_of(r) for r in ordered], [y_of(r) for r in ordered], "-o", c="#dd8452",
            label="Pareto front", ms=5)
    for r in ordered:
        ax.annotate(f"#{r.number} {r.label}", (x_of(r), y_of(r)), fontsize=7)
    if picked is not None and picked in shown:
        ax.scatter([x_of(picked)], [y_of(picked)], marker="*", s=260, c="#c44e52",
                   label=f"pick #{picked.number}", zorder=5)
    left_out = len(rows) - len(shown)
    ax.set_title(f"{len(rows)} trials" + (f" ({left_out} not shown: perplexity not finite)"
                                          if left_out else ""), fontsize=9)
    ax.set_xlabel("held-out perplexity (lower is better)" if x_of is perplexity else "trial")
    ax.set_ylabel("worst-case retention ratio (higher is better)" if y_of is worst_retention
                  else "trial")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, format="png")
    except OSError as err:
        return f"cannot write the plot to {path}: {err}"
    finally:
        plt.close(fig)
    return None
