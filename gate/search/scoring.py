"""A trial's objectives and constraints, derived from the gate policy.

**Objectives** (what the search optimises, one Optuna direction each):

* every set of every ``retention`` check: ``retention:<set>`` = the candidate's score on
  that set divided by the baseline's (the parent's own score with ``baseline: parents``,
  the release's with ``baseline: release``), maximised; the raw score when the baseline
  is 0 or absent. Scores are :func:`gate.checks.retention.score`, the gate's own
  function, on the policy's data, limit and metric;
* every ``perplexity`` check: ``perplexity:<check>`` = held-out perplexity
  (:meth:`gate.evaluate.Evaluator.perplexity`), minimised.

**Constraints** (Optuna ``constraints_func``: a value ``<= 0`` is satisfied), one per
policy check, in policy order, so a *feasible* trial is one that passes the whole
policy as far as the search can tell:

* ``retention``: ``max(min_ratio - ratio, min_score - score)`` over its sets;
* ``perplexity``: ``max(ppl / baseline - 1 - max_increase, ppl - max)``, 1 if not finite;
* ``structural``: the merged tensors are finite and no module rank exceeds ``max_rank``
  (shapes, fingerprint and servability hold by construction for a merge of same-base
  LoRA inputs: the real gate checks them on the pushed pick);
* ``merge_equivalence`` and ``drift``: 0 (a linear-family merge equals its parents by
  construction; a merge has no source to drift from);
* any other kind (``generation``, ...): the gate's own check run on the live model
  (:func:`gate.checks.get_check` with a context whose ``candidate_model`` is the live
  model), 0 for pass/skip and 1 for fail/error.

Baselines are scored once per process, on the same live model: the base (weights
restored), each parent merged in on its own (:mod:`merging.lora.live`). The live model's
weights are bit-identical to those of the model the gate loads for the same merge (or
parent), and scoring uses the gate's own functions, so every objective is exactly the
number ``adapters gate`` computes for that model. The release (``baseline: release``) is
resolved in the store as ``<name>:release`` (or the policy's ``release``) and merged in
the same way when it is an adapter version; without one, release-relative parts are
skipped, as in the gate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from registry.errors import BadInputError, InternalError, NotFoundError

if TYPE_CHECKING:
    from gate.evaluate import Evaluator
    from gate.context import GateContext
    from gate.policy import CheckSpec, Policy
    from merging.adapter import LoraAdapter
    from merging.lora.results import MergeResult
    from merging.lora.live import LiveLora
    from registry.storage.store import Store

BAD = 1e9
"""Objective value of a non-finite perplexity (Optuna refuses NaN)."""


@dataclass(frozen=True)
class Objective:
    """One objective: ``name`` (``retention:<set>`` / ``perplexity:<check>``), direction."""

    name: str
    direction: str
    check: str
    set: str | None = None


@dataclass(frozen=True)
class TrialScore:
    """Objective values (in :attr:`Scorer.objectives` order), constraints (policy order)
    and a per-check summary ``{name: {"status", "value"}}``."""

    values: tuple[float, ...]
    constraints: tuple[float, ...]
    checks: dict[str, dict[str, Any]]

    @property
    def feasible(self) -> bool:
        return all(c <= 0 for c in self.constraints)


class _LiveContext:
    """What a generic gate check sees during a trial: the live model as the candidate."""

    def __init__(self, policy: Policy, evaluator: Evaluator, model: Any, base_dir: Path) -> None:
        self.policy, self.evaluator, self._model, self.base_dir = policy, evaluator, model, base_dir

    def candidate_model(self) -> Any:
        return self._model


class Scorer:
    """Scores live merges against a policy (see module docstring).

    Args:
        policy: The validated policy.
        evaluator: The process's evaluator (its base already wrapped by ``live``); None
            (with ``live`` None) when nothing will be scored, only named.
        live: The live model (a candidate's weights merged in place).
        parents: ``(name, adapter)`` of each input, in order.
        store: The registry (for a release baseline).
        name: The name the pick will be pushed under (its ``release`` alias).
        base_dir: The base model directory.
        workdir: Scratch space (a release is materialized there).

    Raises:
        BadInputError: The policy has neither a retention nor a perplexity check, or a
            retention set (``baseline: parents``) names no input, or two retention checks
            score the same set.
    """

    def __init__(self, policy: Policy, evaluator: Evaluator | None, live: LiveLora | None,
                 parents: Sequence[tuple[str, LoraAdapter]], *, store: Store | None, name: str,
                 base_dir: Path, workdir: Path) -> None:
        self.policy, self.ev, self.live = policy, evaluator, live
        self.parents = dict(parents)
        self.store, self.name, self.base_dir, self.workdir = store, name, base_dir, workdir
        self.objectives: list[Objective] = []
        for spec in policy.checks:
            if spec.kind == "retention":
                for set_name in spec["sets"]:
                    if spec["baseline"] == "parents" and set_name not in self.parents:
                        raise BadInputError(
                            f"retention set {set_name!r} ({spec.name}) names no input of the search "
                            f"(inputs: {', '.join(self.parents)})",
                            fix="name the sets after the inputs, as the gate does for a merge")
                    twice = next((o for o in self.objectives if o.set == set_name), None)
                    if twice is not None:  # one objective per set: a second would overwrite it
                        raise BadInputError(
                            f"retention set {set_name!r} is scored by two checks ({twice.check}, "
                            f"{spec.name}): the search optimises one objective per set",
                            fix="keep one retention check per set in the search's policy (the "
                                "gate can still run both on the pick)")
                    self.objectives.append(Objective(f"retention:{set_name}", "maximize",
                                                     spec.name, set_name))
            elif spec.kind == "perplexity":
                self.objectives.append(Objective(f"perplexity:{spec.name}", "minimize", spec.name))
        if not self.objectives:
            raise BadInputError("the policy has no retention or perplexity check to optimise",
                                fix="add a retention check (one set per input) to the policy")
        self.constraint_names = [spec.name for spec in policy.checks]
        self._data: dict[tuple[str, str], Any] = {}
        self.baselines: dict[str, float | None] = {}

    # --- data and baselines ------------------------------------------------------------
    def _pairs(self, spec: CheckSpec, set_name: str) -> list[tuple[str, str]]:
        from gate.eval_data import read_pairs

        key = (spec.name, set_name)
        if key not in self._data:
            self._data[key] = read_pairs(spec.data_file(f"sets.{set_name}"), limit=spec["limit"])
        return self._data[key]

    def _texts(self, spec: CheckSpec) -> list[str]:
        from gate.eval_data import read_texts

        key = (spec.name, "")
        if key not in self._data:
            self._data[key] = read_texts(spec.data_file("data"), field=spec["field"], limit=spec["limit"])
        return self._data[key]

    def _release(self) -> LoraAdapter | None:
        from merging.adapter import load_adapter

        if self.store is None:
            return None
        ref = self.policy.release or f"{self.name}:release"
        try:
            version = self.store.resolve(ref)
        except NotFoundError:
            return None
        if version.kind != "adapter":
            return None
        return load_adapter(self.store.materialize(version, self.workdir / "release"))

    @property
    def _ev(self) -> Evaluator:
        """The evaluator; a scorer built only to name objectives has none."""
        if self.ev is None:
            raise InternalError("this scorer was built without an evaluator (naming only)")
        return self.ev

    @property
    def _lora(self) -> LiveLora:
        """The live model; a scorer built only to name objectives has none."""
        if self.live is None:
            raise InternalError("this scorer was built without a live model (naming only)")
        return self.live

    def prepare(self) -> dict[str, float | None]:
        """Score every baseline once (leaves the live model cleared).

        Returns:
            ``{"<check>:<set or parent/base/release>": score}``.
        """
        from gate.checks.retention import score

        release = None
        needs_release = any(s["baseline"] == "release" for s in self.policy.checks
                            if s.kind in ("retention", "perplexity"))
        if needs_release:
            release = self._release()
        for spec in self.policy.checks:
            if spec.kind == "retention":
                for set_name in spec["sets"]:
                    source = self.parents[set_name] if spec["baseline"] == "parents" else release
                    value = None
                    if source is not None:
                        self._lora.load_adapter(source)
                        value = score(spec, self._ev, self._lora.model, self._pairs(spec, set_name))
                    self.baselines[f"{spec.name}:{set_name}"] = value
            elif spec.kind == "perplexity":
                texts = self._texts(spec)
                if spec["baseline"] == "base":
                    self._lora.clear()
                    value = self._ev.perplexity(self._lora.model, texts)
                elif spec["baseline"] == "parents":
                    values = []
                    for adapter in self.parents.values():
                        self._lora.load_adapter(adapter)
                        values.append(self._ev.perplexity(self._lora.model, texts))
                    value = max(values)
                elif release is not None:
                    self._lora.load_adapter(release)
                    value = self._ev.perplexity(self._lora.model, texts)
                else:
                    value = None
                self.baselines[f"{spec.name}:baseline"] = value
        self._lora.clear()
        return dict(self.baselines)

    # --- one trial ---------------------------------------------------------------------
    def _retention(self, spec: CheckSpec, values: dict[str, float]) -> tuple[float, dict]:
        from gate.checks.retention import score

        worst, rows = -math.inf, {}
        for set_name in spec["sets"]:
            cand = score(spec, self._ev, self._lora.model, self._pairs(spec, set_name))
            base = self.baselines.get(f"{spec.name}:{set_name}")
            ratio = cand / base if base else None
            values[f"retention:{set_name}"] = ratio if ratio is not None else cand
            if spec["min_ratio"] is not None and ratio is not None:
                worst = max(worst, spec["min_ratio"] - ratio)
            if spec["min_score"] is not None:
                worst = max(worst, spec["min_score"] - cand)
            rows[set_name] = {"score": cand, "baseline": base, "ratio": ratio}
        return (worst if worst > -math.inf else 0.0), rows

    def _perplexity(self, spec: CheckSpec, values: dict[str, float]) -> tuple[float, dict]:
        ppl = self._ev.perplexity(self._lora.model, self._texts(spec))
        base = self.baselines.get(f"{spec.name}:baseline")
        if not math.isfinite(ppl):
            values[f"perplexity:{spec.name}"] = BAD
            return 1.0, {"perplexity": None, "baseline": base}
        values[f"perplexity:{spec.name}"] = ppl
        worst = -math.inf
        if spec["max_increase"] is not None and base:
            worst = max(worst, ppl / base - 1.0 - spec["max_increase"])
        if spec["max"] is not None:
            worst = max(worst, ppl - spec["max"])
        return (worst if worst > -math.inf else 0.0), {"perplexity": ppl, "baseline": base}

    def _structural(self, spec: CheckSpec, result: MergeResult) -> tuple[float, dict]:
        import torch

        bad = [k for k, t in result.tensors.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        ranks = [m["rank"] for m in result.report["modules"].values()]
        over = spec.params.get("max_rank") is not None and max(ranks, default=0) > spec["max_rank"]
        failed = (bool(bad) and spec.params.get("finite", True)) or over
        return (1.0 if failed else 0.0), {"nonfinite": len(bad), "max_rank": max(ranks, default=0)}

    def _generic(self, spec: CheckSpec) -> tuple[float, dict]:
        from gate.checks import get_check

        try:
            # the live context offers what generic checks read from a GateContext
            # (policy, evaluator, base_dir, candidate_model): duck-typed, hence the cast
            outcome = get_check(spec.kind)(spec, cast("GateContext", _LiveContext(self.policy, self._ev, self._lora.model,
                                                              self.base_dir)))
            status, message = outcome.status, outcome.message
        except Exception as err:  # noqa: BLE001 - a check that cannot run is a failed constraint
            status, message = "error", f"{type(err).__name__}: {err}"
        return (0.0 if status in ("pass", "skip") else 1.0), {"status": status,
                                                                "message": message[:200]}

    def refused(self, reason: str) -> TrialScore:
        """The score of a trial whose merge the engine refused (:class:`registry.errors.MergeRangeError`):
        the worst value of every objective (retention 0, perplexity :data:`BAD`) and every
        constraint violated, so the trial counts, is never picked, and steers the sampler away."""
        values = tuple(0.0 if o.direction == "maximize" else BAD for o in self.objectives)
        checks = {spec.name: {"kind": spec.kind, "ok": False, "status": "not run", "detail": reason}
                  for spec in self.policy.checks}
        return TrialScore(values=values, constraints=(1.0,) * len(self.constraint_names), checks=checks)

    def score(self, result: MergeResult) -> TrialScore:
        """Score the merge currently loaded in the live model."""
        values: dict[str, float] = {}
        constraints, checks = [], {}
        for spec in self.policy.checks:
            if spec.kind == "retention":
                value, detail = self._retention(spec, values)
            elif spec.kind == "perplexity":
                value, detail = self._perplexity(spec, values)
            elif spec.kind == "structural":
                value, detail = self._structural(spec, result)
            elif spec.kind in ("merge_equivalence", "drift"):
                value, detail = 0.0, {"status": "skip"}
            else:
                value, detail = self._generic(spec)
            constraints.append(float(value))
            checks[spec.name] = {"kind": spec.kind, "ok": value <= 0, **detail}
        return TrialScore(values=tuple(values[o.name] for o in self.objectives),
                          constraints=tuple(constraints), checks=checks)
