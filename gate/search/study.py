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
  next trial any worker starts marks it FAIL (Optuna's ``fail_stale_trials``; a trial
  killed before its first heartbeat counts too, :func:`_storage_class`) and the study goes
  on; Optuna's retry callback then enqueues the failed trial's parameters once more (with
  the enqueued defaults it held), so a kill does not drop a method's default merge from
  the study. A retried trial gets a new number, and proposals are seeded by trial number,
  so a search that lost a worker may pick differently from an uninterrupted one.
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

from registry.errors import AdapterkitError, BadInputError, ConflictError, EnvironmentFailure

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
                return _storage_class()(
                    url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                    else None, **_retry_once())
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds
            error = err
            if any(word in str(err) for word in ENVIRONMENT_WORDS):
                break  # a retry cannot help
            time.sleep(0.5 * (attempt + 1))
    detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    if any(word in str(error) for word in ENVIRONMENT_WORDS):
        raise EnvironmentFailure(f"cannot open storage {_shown(url)}: {detail}",
                                 fix="use a storage this process can write (the directory must "
                                     "exist and be writable)")
    raise BadInputError(f"cannot open storage {_shown(url)}: {detail}",
                        fix="pass e.g. --storage sqlite:///study.db (a driver for other "
                            "databases must be installed)")


def _retry_once() -> dict[str, Any]:
    """The storage argument that re-enqueues a stale (killed) trial's parameters once:
    ``RetryHeartbeatStaleTrialCallback`` (Optuna >= 4.9), else the older
    ``RetryFailedTrialCallback`` (deprecated there, removed in 6)."""
    import optuna

    storages = optuna.storages
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}


def _storage_class() -> type:
    """``RDBStorage`` that also takes for stale a RUNNING trial that never recorded a
    heartbeat and started more than the grace period ago.

    Optuna marks a trial RUNNING, then starts its heartbeat: a worker killed in between
    (a few milliseconds, while the sampler proposes) leaves a trial Optuna never fails, so
    the study stays one trial short for good (found by a QA pass). A live trial records
    its first heartbeat within milliseconds, so one without any after the grace period is
    a dead worker's.
    """
    import datetime

    import optuna
    import sqlalchemy

    class OrphanAwareStorage(optuna.storages.RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = list(super()._get_stale_trial_ids(study_id))
            grace = datetime.timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 1))
            now = datetime.datetime.now()
            old = [t._trial_id for t in self.get_all_trials(
                       study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.datetime_start is not None and now - t.datetime_start > grace
                   and t._trial_id not in stale]
            if not old:
                return stale
            try:
                with self.engine.connect() as conn:
                    beating = {row[0] for row in conn.execute(sqlalchemy.text(
                        "SELECT trial_id FROM trial_heartbeats WHERE trial_id IN "
                        f"({', '.join(str(int(i)) for i in old)})"))}
            except sqlalchemy.exc.SQLAlchemyError:  # another schema: Optuna's own rule only
                return stale
            return stale + [i for i in old if i not in beating]

    return OrphanAwareStorage


ENVIRONMENT_WORDS = ("readonly", "read-only", "unable to open database file",
                     "Permission denied", "disk I/O error", "Connection refused",
                     "database or disk is full")
"""Storage errors that are the environment's (exit 6), not a bad URL (exit 2)."""


def _shown(url: str) -> str:
    """The URL for a message, its password masked."""
    try:
        from sqlalchemy.engine import make_url

        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - unparsable: show no credentials at all
        return repr(url.split("://", 1)[0] + "://...")


IDENTITY_KEY = "adapterkit_search"
"""Study user attribute: the digest of what the search is (inputs, policy, space, sampler,
seed); a worker joins only a study made for the same search."""


def open_study(storage: Any, name: str, directions: Sequence[str], sampler: Any,
               identity: str) -> tuple[Any, bool]:
    """Create the study, or join it if it exists; returns ``(study, created)``.

    Args:
        identity: The search's digest (:data:`IDENTITY_KEY`): a study made for other
            inputs, another policy or space holds trials scored for those, so joining it
            would push a pick scored for something else.

    Raises:
        ConflictError: The existing study was made for another search.
        BadInputError: The existing study has other objectives.
        EnvironmentFailure: The storage cannot be written (read-only database, ...).
    """
    import optuna

    try:
        try:
            study = optuna.create_study(storage=storage, sampler=sampler, study_name=name,
                                        directions=[str(d) for d in directions])  # type: ignore[misc]  # optuna types a Literal; ours are validated names
            study.set_user_attr(IDENTITY_KEY, identity)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except optuna.exceptions.StorageInternalError as err:
        cause = str(err.__cause__ or err).strip().splitlines()[0][:200]
        raise EnvironmentFailure(f"cannot write the study storage: {cause}",
                                 fix="use a storage this process can write (--storage)") from None
    want = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize"
            else optuna.study.StudyDirection.MINIMIZE for d in directions]
    if list(study.directions) != want:
        raise BadInputError(f"study {name!r} exists with other objectives",
                            fix="pick another --study name for a different search")
    made_for = study.user_attrs.get(IDENTITY_KEY)
    if made_for is None:  # its creator has not labelled it yet: label it the same way
        study.set_user_attr(IDENTITY_KEY, identity)
        made_for = study.user_attrs.get(IDENTITY_KEY, identity)
    if made_for != identity:
        raise ConflictError(f"study {name!r} was made for another search (other inputs, "
                            "policy, space, sampler or seed); its trials were scored for that",
                            fix="pick another --study name, or run the same search to join it")
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


def enqueue_defaults(study: Any, defaults: Sequence[dict[str, Any]], *, created: bool) -> int:
    """Queue the space's default merges (the hand-made recipes every search compares).

    A new study gets each once. A rejoined one gets again each default whose every trial
    failed: a Ctrl-C'd trial is marked failed, and Optuna's retry only covers trials whose
    heartbeat stopped, so the default was lost for good (found by a QA pass).

    Returns:
        How many trials were queued.
    """
    from optuna.trial import TrialState

    trials = [] if created else study.get_trials(deepcopy=False)
    queued = 0
    for params in defaults:
        mine = [t for t in trials if t.system_attrs.get("fixed_params") == params]
        if created or (mine and all(t.state == TrialState.FAIL for t in mine)):
            study.enqueue_trial(params, skip_if_exists=created)
            queued += 1
    return queued


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

    while _counts(study) < trials:
        try:
            study.optimize(wrapped, n_trials=trials, callbacks=[stop_when_full])
            break
        except ValueError as err:
            # SQLite cannot lock a waiting (enqueued) trial, so two workers starting together
            # may both run one (optuna#4002); the first to tell wins, the other goes on
            if "Cannot tell a COMPLETE trial" not in str(err):
                raise
            done["n"] -= 1  # that evaluation was not counted in the study
        except AdapterkitError:
            raise  # the objective's own errors keep their codes, whatever their text says
        except Exception as err:
            failure = storage_failure(err)
            if failure is None:
                raise
            raise failure from err
    return done["n"]


def storage_failure(err: BaseException) -> EnvironmentFailure | None:
    """The study storage failing under a trial (exit 6), else None.

    A commit that fails (a full disk: "database or disk is full") raises optuna's
    ``StorageInternalError``, which optuna's trial loop then trips over with a bare
    ``AssertionError("Should not reach.")``: an internal error (exit 70) before. The
    failure is found anywhere in the exception's chain.
    """
    from optuna.exceptions import StorageInternalError

    seen: BaseException | None = err
    for _ in range(8):  # a short chain: the assertion, optuna's error, the driver's
        if seen is None:
            return None
        # optuna's commit failure, or the database driver's own (sqlalchemy, sqlite3)
        module = type(seen).__module__ or ""
        if isinstance(seen, StorageInternalError) or (
                module.startswith(("sqlalchemy", "sqlite3", "psycopg", "pymysql"))
                and any(w in str(seen) for w in ENVIRONMENT_WORDS)):
            detail = " ".join(str(seen).split())[:200] or type(seen).__name__
            return EnvironmentFailure(f"the study storage failed: {detail}",
                                      fix="free space or fix the storage, then run the search "
                                          "again: finished trials are kept")
        seen = seen.__cause__ or seen.__context__
    return None
