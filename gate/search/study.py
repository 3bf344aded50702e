"""The Optuna side of the merge search: sampler, storage, study and the shared budget.

* **Sampler**: TPE (default; multi-objective, with ``constraints_func``) or NSGA-II
  (``--sampler nsga2``), both seeded. :class:`TrialSeededSampler` rebuilds the sampler
  for every trial with the seed ``sha256(seed, trial number)``: a trial's proposal then
  depends on the study's history and its number only, not on which process asks, so
  one worker is reproducible and two workers with the same ``--seed`` never draw the
  same random start-up points.
* **Storage**: in memory by default (the study lives as long as the command); with
  ``--storage URL`` (``sqlite:///study.db``, any SQLAlchemy URL Optuna's ``RDBStorage``
  takes, e.g. PostgreSQL) the study is shared by every process that names it
  (``--study NAME``). RDB storages run with a heartbeat (``--heartbeat`` seconds, grace
  2x): a worker that dies mid-trial leaves a RUNNING trial whose heartbeat stops; the
  next trial any worker starts marks it FAIL (Optuna's ``fail_stale_trials``) and the
  study goes on.
* **Defaults first**: the process that *creates* the study (creation is atomic in the
  storage) enqueues each method's default merge (``enqueue_trial``); joining workers
  do not, so nothing is enqueued twice.
* **Budget**: ``--trials N`` is the study's number of COMPLETE trials, shared by all
  workers. At its start a trial counts the COMPLETE trials plus the RUNNING/WAITING ones
  numbered below it; when that reaches ``N`` it is over budget: it is marked PRUNED
  (user attribute ``over_budget``) without evaluating anything, and the worker stops.
  Trial numbers are unique and ordered, so workers never evaluate more than ``N``
  trials that finish, and a failed (killed) trial's slot goes to the next one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from registry.errors import BadInputError

SAMPLERS = ("tpe", "nsga2")
OPEN_ATTEMPTS = 5
FEASIBLE_KEY = "constraints"


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: 31 bits of ``sha256(seed, number)``."""
    digest = hashlib.sha256(f"adapterkit-search\x1f{seed}\x1f{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def constraints_of(trial: Any) -> Sequence[float]:
    """``constraints_func`` for Optuna: the constraints the objective stored."""
    return trial.user_attrs.get(FEASIBLE_KEY, (1.0,))


def _native_constraints() -> bool:
    """Optuna >= 5 takes constraints per trial (``Trial.set_constraint``)."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def record_constraints(trial: Any, names: Sequence[str], values: Sequence[float]) -> None:
    """Store a trial's constraints where the sampler reads them (and as a user attribute).

    Optuna >= 5: ``trial.set_constraint(name, value)`` per check; older versions read
    the user attribute through ``constraints_func`` (:func:`constraints_of`).
    """
    trial.set_user_attr(FEASIBLE_KEY, [float(v) for v in values])
    if _native_constraints():
        for name, value in zip(names, values, strict=True):
            trial.set_constraint(name, float(value))


def _factory(kind: str, trials: int) -> Callable[[int], Any]:
    import optuna

    extra: dict[str, Any] = {} if _native_constraints() else {"constraints_func": constraints_of}

    if kind == "tpe":
        startup = max(2, min(10, trials // 3))
        return lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup,
                                                    **extra)
    if kind == "nsga2":
        population = max(4, min(20, trials // 3))
        return lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=population,
                                                       **extra)
    raise BadInputError(f"unknown sampler {kind!r}", fix=f"use one of {', '.join(SAMPLERS)}")


def make_sampler(kind: str, seed: int, trials: int) -> Any:
    """A :class:`TrialSeededSampler` around a TPE or NSG-II sampler.

    Raises:
        BadInputError: Unknown sampler.
    """
    import optuna

    factory = _factory(kind, trials)

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """Delegates to ``factory(trial_seed(seed, number))``, rebuilt per trial."""

        def __init__(self) -> None:
            self.kind, self.seed = kind, seed
            self._inner = factory(trial_seed(seed, -1))

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self._inner.sample_independent(study, trial, name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._inner = factory(trial_seed(seed, trial.number))
            self._inner.before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:  # the seed is the trial's, by design
            pass

    return TrialSeededSampler()


def open_storage(url: str | None, heartbeat: int) -> Any:
    """Optuna storage: in memory for None, else an ``RDBStorage`` with a heartbeat.

    Raises:
        BadInputError: The URL cannot be opened (driver missing, bad URL).
    """
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if heartbeat < 1:
        raise BadInputError(f"--heartbeat must be >= 1 second, got {heartbeat}", fix="e.g. --heartbeat 30")
    import time
    import warnings

    error: Exception | None = None
    for attempt in range(OPEN_ATTEMPTS):  # workers starting together race to create the schema
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                    else None)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds
            error = err
            time.sleep(0.5 * (attempt + 1))
    raise BadInputError(f"cannot open storage {url!r}: {type(error).__name__}: {error}",
                        fix="pass e.g. --storage sqlite:///study.db (a driver for other "
                            "databases must be installed)")


def open_study(storage: Any, name: str, directions: Sequence[str], sampler: Any
               ) -> tuple[Any, bool]:
    """Create the study, or join it if it exists; returns ``(study, created)``.

    Raises:
        BadInputError: The existing study has other objectives (another search).
    """
    import optuna

    try:
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=name,
                                    directions=[str(d) for d in directions])  # type: ignore[misc]  # optuna types a Literal; ours are validated names
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    want = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize"
            else optuna.study.StudyDirection.MINIMIZE for d in directions]
    if list(study.directions) != want:
        raise BadInputError(f"study {name!r} exists with other objectives",
                            fix="pick another --study name for a different search")
    return study, False


def _counts(study: Any, number: int | None = None) -> int:
    """COMPLETE trials plus RUNNING/WAITING ones numbered below ``number``."""
    from optuna.trial import TrialState

    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            done += 1
        elif number is not None and t.number < number and t.state in (TrialState.RUNNING,
                                                                      TrialState.WAITING):
            done += 1
    return done


def study_full(study: Any, trials: int) -> bool:
    """Whether the study already holds ``trials`` COMPLETE trials."""
    return _counts(study) >= trials


def run_worker(study: Any, objective: Callable[[Any], Sequence[float]], trials: int) -> int:
    """Evaluate trials until the study holds ``trials`` COMPLETE trials (see module doc).

    Returns:
        How many trials this worker evaluated.
    """
    import optuna

    done = {"n": 0}

    def wrapped(trial: Any) -> Sequence[float]:
        if _counts(study, trial.number) >= trials:
            trial.set_user_attr("over_budget", True)
            study.stop()
            raise optuna.TrialPruned("over the study's trial budget")
        values = objective(trial)
        done["n"] += 1
        return values

    def stop_when_full(st: Any, _trial: Any) -> None:
        if _counts(st) >= trials:
            st.stop()

    if _counts(study) < trials:
        study.optimize(wrapped, n_trials=trials, callbacks=[stop_when_full])
    return done["n"]
