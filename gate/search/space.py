"""The merge search's space: which method, weights and parameters a trial may choose.

Every trial picks a ``method`` from ``--methods``, a weight per input, and the
parameters *that method declares* (:attr:`merging.lora.methods.MergeMethod.accepted`):

==================  ======================  ==================================================
parameter           default range           hard bounds (from :mod:`merging.lora.methods`)
==================  ======================  ==================================================
``w0``, ``w1``, ..  [0.25, 1.5] each        finite
``density``         [0.1, 1.0]              (0, 1]
``lambda``          [0.5, 1.5]              finite
``gamma``           [0.0, 0.1]              [0, 1)          (breadcrumbs*)
``epsilon``         [0.0, 0.2]              [0, 1), clipped to 0.95 min(density, 1 - density)
                                                            (della*; DELLA needs density ± epsilon in (0, 1))
``sign_election``   sum, frequency,         :data:`merging.lora.methods.SIGN_ELECTIONS`
                    mergekit
``align``           none, knots             none + :data:`merging.lora.methods.ALIGNMENTS`
                                            (entry-wise methods only)
==================  ======================  ==================================================

``normalize`` is not searched (weights already scale the result) and the merge seed
is ``--seed``. ``--space space.yaml`` (read with :func:`gate.safe_yaml.load_yaml`)
overrides any row: ``[low, high]`` for a range, a single value to fix it (not
searched), a list of choices for the categorical ones; ``weights`` sets every input's
range and ``w0``, ``w1``, .. one input's; ``methods: [...]`` (not empty) gives the
methods when ``--methods`` is not passed. Every range is checked against the
methods' own validation (:meth:`merging.lora.methods.MergeMethod.resolve` on both ends), so
a space never proposes parameters the engine would refuse. What only the inputs' values
decide (weights or a lambda so large that the merged delta overflows float32) is left to
the trial: its merge is refused (:class:`registry.errors.MergeRangeError`) and the trial
is scored as refused (every objective at its worst, every constraint failed, the reason
shown), so it counts and steers the sampler away.

Optuna parameter names are the table's names and ``method``; a parameter a method
does not take is simply not suggested in that trial (a conditional space, which
Optuna's TPE and NSGA-II samplers handle). :meth:`SearchSpace.defaults` gives each
method's defaults (weights 1, density 0.5, ...), which the search enqueues as its
first trials: the hand-made merges are always on the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.lora.methods import (ALIGNMENTS, DEFAULT_DENSITY, DEFAULT_EPSILON, DEFAULT_GAMMA,
                             SIGN_ELECTIONS, get_method)
from registry.errors import BadInputError, shorten

DEFAULT_METHODS = ("ties", "dare_ties", "breadcrumbs_ties", "della", "task_arithmetic")
RANGES = {"weights": (0.25, 1.5), "density": (0.1, 1.0), "lambda": (0.5, 1.5),
          "gamma": (0.0, 0.1), "epsilon": (0.0, 0.2)}
CHOICES = {"sign_election": tuple(SIGN_ELECTIONS), "align": ("none", *ALIGNMENTS)}
NUMERIC_DEFAULTS: dict[str, float] = {"weights": 1.0, "density": DEFAULT_DENSITY, "lambda": 1.0,
                                      "gamma": DEFAULT_GAMMA, "epsilon": DEFAULT_EPSILON}
CHOICE_DEFAULTS: dict[str, str] = {"sign_election": "sum", "align": "none"}
DEFAULTS: dict[str, float | str] = {**NUMERIC_DEFAULTS, **CHOICE_DEFAULTS}
NUMERIC = ("density", "lambda", "gamma", "epsilon")
EPSILON_MARGIN = 0.95


@dataclass(frozen=True)
class Choice:
    """One trial's merge: method, one weight per input, explicit method parameters."""

    method: str
    weights: tuple[float, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "weights": list(self.weights), "params": dict(self.params)}


@dataclass(frozen=True)
class SearchSpace:
    """Validated ranges (``(low, high)``, equal ends = fixed) and choices.

    Attributes:
        methods: Methods a trial may pick.
        inputs: Number of merge inputs (one weight each).
        ranges: ``weights`` and each numeric parameter -> ``(low, high)``.
        choices: ``sign_election`` and ``align`` -> allowed values.
    """

    methods: tuple[str, ...]
    inputs: int
    ranges: Mapping[str, tuple[float, float]]
    choices: Mapping[str, tuple[str, ...]]

    def to_json(self) -> dict[str, Any]:
        return {"methods": list(self.methods), "inputs": self.inputs,
                "ranges": {k: list(v) for k, v in sorted(self.ranges.items())},
                "choices": {k: list(v) for k, v in sorted(self.choices.items())}}

    def weight_range(self, i: int) -> tuple[float, float]:
        """Input ``i``'s weight range: its own ``w<i>`` row, else the ``weights`` row."""
        return self.ranges.get(f"w{i}", self.ranges["weights"])

    def _float(self, trial: Any, name: str, key: str) -> float:
        return _between(trial, name, self.ranges[key])

    def _pick(self, trial: Any, key: str) -> str:
        options = self.choices[key]
        return options[0] if len(options) == 1 else str(trial.suggest_categorical(key, list(options)))

    def suggest(self, trial: Any) -> Choice:
        """The merge an Optuna trial proposes (see module docstring)."""
        method = self.methods[0] if len(self.methods) == 1 else str(
            trial.suggest_categorical("method", list(self.methods)))
        accepted = get_method(method).accepted
        weights = tuple(_between(trial, f"w{i}", self.weight_range(i)) for i in range(self.inputs))
        params: dict[str, Any] = {}
        for key in NUMERIC:
            if key in accepted:
                params[key] = self._float(trial, key, key)
        if "epsilon" in params:
            density = params.get("density", DEFAULT_DENSITY)
            params["epsilon"] = min(params["epsilon"],
                                    EPSILON_MARGIN * min(density, 1.0 - density)) if density < 1 \
                else params["epsilon"]
        if "sign_election" in accepted:
            params["sign_election"] = self._pick(trial, "sign_election")
        if "align" in accepted:
            align = self._pick(trial, "align")
            if align != "none":
                params["align"] = align
        return Choice(method, weights, params)

    def defaults(self) -> list[dict[str, Any]]:
        """Each method's default merge as Optuna parameters (clamped into the ranges)."""
        out = []
        for method in self.methods:
            accepted = get_method(method).accepted
            params: dict[str, Any] = {}
            if len(self.methods) > 1:
                params["method"] = method
            for i in range(self.inputs):
                low, high = self.weight_range(i)
                if low < high:
                    params[f"w{i}"] = _clamp(NUMERIC_DEFAULTS["weights"], (low, high))
            for key in NUMERIC:
                if key in accepted and self.ranges[key][0] < self.ranges[key][1]:
                    params[key] = _clamp(NUMERIC_DEFAULTS[key], self.ranges[key])
            for key in ("sign_election", "align"):
                if key in accepted and len(self.choices[key]) > 1:
                    value = DEFAULTS[key]
                    params[key] = value if value in self.choices[key] else self.choices[key][0]
            out.append(params)
        return out


def _between(trial: Any, name: str, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(low) if low == high else float(trial.suggest_float(name, low, high))


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _range(key: str, value: Any) -> tuple[float, float]:
    """``[low, high]`` or a single number -> ``(low, high)``.

    Raises:
        BadInputError: Not one or two finite numbers, or low > high.
    """
    items = value if isinstance(value, list) else [value]
    if not 1 <= len(items) <= 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                       or not _finite(v) for v in items):
        raise BadInputError(f"space field {key} must be [low, high] or one number, got "
                            f"{shorten(repr(value))}",
                            fix=f"write e.g. {key}: {list(RANGES.get(key, RANGES['weights']))}")
    low, high = float(items[0]), float(items[-1])
    if low > high:
        raise BadInputError(f"space field {key}: low {low:g} > high {high:g}",
                            fix=f"write {key}: [{high:g}, {low:g}]")
    return low, high


def _finite(value: int | float) -> bool:
    """A finite float (a YAML integer of 400 digits does not convert: ``OverflowError``)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _choices(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    allowed = CHOICES[key]
    if not items or any(v not in allowed for v in items):
        raise BadInputError(f"space field {key} must be a list of {', '.join(allowed)}, got "
                            f"{shorten(repr(value))}", fix=f"write e.g. {key}: {list(allowed)}")
    return tuple(dict.fromkeys(str(v) for v in items))


def _check_bounds(methods: Sequence[str], ranges: Mapping[str, tuple[float, float]],
                  inputs: int) -> None:
    """Resolve both ends of every range with each method that takes the parameter.

    Raises:
        BadInputError: An end the method's own validation refuses (named with the field).
    """
    for method in methods:
        spec = get_method(method)
        for key in NUMERIC:
            if key not in spec.accepted:
                continue
            for end in ranges[key]:
                given: dict[str, Any] = {key: end}
                if key == "epsilon":  # clipped per trial; checked at density 0.5
                    given = {key: min(end, EPSILON_MARGIN * 0.5), "density": 0.5}
                elif key == "density" and "epsilon" in spec.accepted:
                    given["epsilon"] = 0.0
                try:
                    spec.resolve(given, [1.0] * inputs)
                except BadInputError as err:
                    raise BadInputError(f"space field {key}: {err.message}",
                                        fix=f"keep {key} inside the bounds {method} accepts "
                                            f"(default {list(RANGES[key])})") from None


def build_space(inputs: int, methods: Sequence[str] | None = None,
                space_file: str | Path | None = None) -> SearchSpace:
    """The search space for ``inputs`` adapters: defaults, then ``space_file`` overrides.

    Args:
        inputs: Number of adapters merged.
        methods: ``--methods`` (wins over the file's ``methods``; default
            :data:`DEFAULT_METHODS`).
        space_file: Optional YAML with overrides (see module docstring).

    Raises:
        BadInputError: Unknown method or field, a malformed or out-of-bounds range,
            an unknown choice, an unreadable or hostile YAML file.
    """
    doc: dict[str, Any] = {}
    if space_file is not None:
        from gate.safe_yaml import load_yaml

        loaded = load_yaml(space_file, what="search space", max_bytes=64 << 10, max_nodes=10_000,
                           fix="fix the YAML (see `adapters merge-search --help` for the fields)")
        if loaded is not None and not isinstance(loaded, dict):
            raise BadInputError(f"search space {space_file} must be a mapping",
                                fix="write e.g. density: [0.2, 0.9]")
        doc = dict(loaded or {})
    per_input = [f"w{i}" for i in range(inputs)]
    known = {"methods", *RANGES, *CHOICES, *per_input}
    unknown = sorted(set(doc) - known, key=str)
    if unknown:
        raise BadInputError(f"space field {shorten(str(unknown[0]))} is not a known field",
                            fix=f"use {', '.join(sorted(known))}")
    if "methods" in doc and not (isinstance(doc["methods"], list) and doc["methods"]):
        raise BadInputError("space field methods must be a non-empty list of method names",
                            fix="write e.g. methods: [ties, dare_ties], or leave it out")
    chosen = list(methods or doc.get("methods") or DEFAULT_METHODS)
    if not all(isinstance(m, str) for m in chosen):
        raise BadInputError("space field methods must be a list of method names",
                            fix="write e.g. methods: [ties, dare_ties]")
    for method in chosen:
        get_method(method)
    ranges = {key: _range(key, doc[key]) if key in doc else RANGES[key] for key in RANGES}
    ranges.update({key: _range(key, doc[key]) for key in per_input if key in doc})
    choices = {key: _choices(key, doc[key]) if key in doc else CHOICES[key] for key in CHOICES}
    _check_bounds(chosen, ranges, inputs)
    return SearchSpace(methods=tuple(dict.fromkeys(chosen)), inputs=inputs, ranges=ranges,
                       choices=choices)
