"""``run_search``: a gate-constrained merge search, from refs to a pushed merge version.

One call is one *worker*:

1. resolve the inputs, check their bases (:func:`merging.lora.inputs.check_bases`), load
   the policy and build the space (:mod:`gate.search.space`);
2. materialize the inputs under the store's ``tmp/``, load the base **once**
   (:class:`gate.evaluate.Evaluator`) and hand it to a :class:`merging.lora.live.LiveLora`;
3. score the baselines (:meth:`gate.search.scoring.Scorer.prepare`);
4. open (or join) the Optuna study and evaluate trials until the study is full
   (:mod:`gate.search.study`): each trial merges in memory
   (:func:`merging.lora.engine.merge_adapters`), merges the factors into the live model's
   weights in place (the gate's merged model, bit for bit) and scores it; its merge, constraints and per-check summary are stored as the trial's
   user attributes, so any worker can rebuild every trial's row;
5. when the study holds its ``--trials`` COMPLETE trials: the front, the pick
   (:mod:`gate.search.front`), and -- unless ``push=False`` -- the pick re-merged
   (deterministic: same method, weights, parameters and seed) and pushed through the
   merge command's own path (:func:`merging.lora.publish.push_merge`). Its lineage is that of
   a plain merge plus ``report.search``: study name, sampler and seed, trial count, the
   picked trial and its objective values, the pick rule, the policy digest, the Optuna
   version, and ``trials_digest``: a canonical-JSON blob (``Store.put_bytes``) holding
   every trial's merge, objective values and constraints. The search's scores are not a
   gate record: gate the pushed version like any merge.

The default study name is ``merge-search-`` + 12 hex digits of the digest of the inputs,
the policy digest, the space, the sampler and the seed: workers started with the same
arguments join the same study, and a search is reproducible (same inputs, seed and
trial count with one worker: the same trials, pick and version).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.search.front import TrialRow, check_rule, pareto_front, pick, plot_front
from gate.search.scoring import Objective, Scorer
from gate.search.space import SearchSpace, build_space
from gate.search.study import (FEASIBLE_KEY, enqueue_defaults, make_sampler, open_storage, open_study,
                               record_constraints, run_worker, study_full)
from registry.digests import canonical_json
from registry.digests import json_digest
from registry.errors import BadInputError, BaseMismatchError, MergeRangeError, NotFoundError, shorten
from registry.fsutil import leased_temp_dir

if TYPE_CHECKING:
    from registry.storage.manifest import PushResult, Version
    from registry.storage.store import Store


@dataclass(frozen=True)
class SearchResult:
    """What one worker saw at its end (see module docstring)."""

    study: str
    sampler: str
    seed: int
    storage: str | None
    budget: int
    objectives: tuple[Objective, ...]
    constraints: tuple[str, ...]
    rows: tuple[TrialRow, ...]
    front: tuple[TrialRow, ...]
    picked: TrialRow | None
    evaluated: int
    baselines: dict[str, float | None]
    space: dict[str, Any]
    optuna_version: str
    pushed: PushResult | None = None
    trials_digest: str | None = None
    plot: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def complete(self) -> bool:
        """The study holds its full trial budget."""
        return len(self.rows) >= self.budget

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "sampler": self.sampler, "seed": self.seed,
                "storage": self.storage, "budget": self.budget, "complete": self.complete,
                "objectives": [{"name": o.name, "direction": o.direction} for o in self.objectives],
                "constraints": list(self.constraints), "baselines": self.baselines,
                "trials": [r.to_json() for r in self.rows],
                "front": [r.number for r in self.front],
                "picked": self.picked.to_json() if self.picked else None,
                "evaluated_here": self.evaluated, "space": self.space,
                "optuna_version": self.optuna_version, "trials_digest": self.trials_digest,
                "pushed": self.pushed.to_json() if self.pushed else None, "plot": self.plot,
                "notes": list(self.notes)}


BASELINES_KEY = "adapterkit.baselines"
"""Study user attribute holding the baseline scores (every worker computes the same)."""

@dataclass(frozen=True)
class SearchSettings:
    """Options of a search (the CLI flags)."""

    methods: Sequence[str] | None = None
    trials: int = 20
    seed: int = 0
    storage: str | None = None
    study: str | None = None
    device: str = "cpu"
    name: str | None = None
    space_file: Path | None = None
    pick_rule: str = "min_retention"
    sampler: str = "tpe"
    heartbeat: int = 30
    plot: Path | None = None
    push: bool = True
    allow_base_mismatch: bool = False


def search_identity(versions: Sequence[Version], policy_digest: str, space: SearchSpace,
                    settings: SearchSettings) -> str:
    """What the search is, as a digest: inputs, policy, space, sampler and seed (a study is
    joined only by the same search: :func:`gate.search.study.open_study`)."""
    return json_digest({"inputs": [v.digest for v in versions], "policy": policy_digest,
                        "space": space.to_json(), "sampler": settings.sampler,
                        "seed": settings.seed})


def check_base_dir(base: Path, versions: Sequence[Version], *, allow_weights_mismatch: bool) -> None:
    """Refuse a ``--base`` that is not the inputs' recorded base, as the gate's structural
    check would refuse the pick (every trial scored on it would be meaningless).

    Raises:
        BaseMismatchError: Another structure, or (unless allowed) other weights.
    """
    from registry.formats.fingerprint import fingerprint_model

    prints = [((v.record.get("base_model") or {}).get("fingerprint") or {}) for v in versions]
    recorded = next((fp for fp in prints if isinstance(fp, dict) and fp.get("struct_digest")), None)
    if recorded is None:
        return
    weights = bool(recorded.get("weights_digest")) and not allow_weights_mismatch
    actual = fingerprint_model(base, weights=weights)
    if actual.struct_digest != recorded["struct_digest"]:
        raise BaseMismatchError(f"{base} is not the inputs' base model (structure digest "
                                f"{actual.struct_digest[:19]} != recorded {recorded['struct_digest'][:19]})",
                                fix="pass --base with the model the adapters were trained on")
    if weights and actual.weights_digest != recorded["weights_digest"]:
        raise BaseMismatchError(f"{base} has the inputs' base structure but other weights "
                                "(the gate would fail the pick on its fingerprint)",
                                fix="pass --base with the exact checkpoint the adapters were trained "
                                    "on, or --allow-base-mismatch")


def study_name(versions: Sequence[Version], policy_digest: str, space: SearchSpace,
               settings: SearchSettings) -> str:
    """The default study name (see module docstring)."""
    digest = search_identity(versions, policy_digest, space, settings)
    return "merge-search-" + digest.split(":", 1)[1][:12]


def _row(trial: Any) -> TrialRow:
    merge = trial.user_attrs.get("merge") or {}
    return TrialRow(number=trial.number, method=merge.get("method", "?"),
                    weights=tuple(merge.get("weights") or ()),
                    parameters=dict(merge.get("parameters") or {}),
                    values=dict(trial.user_attrs.get("values") or {}),
                    constraints=tuple(trial.user_attrs.get(FEASIBLE_KEY) or (1.0,)),
                    checks=dict(trial.user_attrs.get("checks") or {}),
                    refused=trial.user_attrs.get("refused"))


def _objective(scorer: Scorer, space: SearchSpace, adapters: Sequence[Any], labels: Sequence[str],
               live: Any, seed: int, on_trial: Callable[[TrialRow], None] | None,
               device: str = "cpu") -> Callable[[Any], Sequence[float]]:
    from merging.lora.engine import merge_adapters

    def objective(trial: Any) -> Sequence[float]:
        choice = space.suggest(trial)
        try:
            result = merge_adapters(adapters, list(choice.weights), choice.method,
                                    params=dict(choice.params), seed=seed, labels=labels,
                                    device=device)
        except MergeRangeError as err:  # the recipe's values (a huge lambda, ...), not the inputs
            score = scorer.refused(err.message)
            merge = {"method": choice.method, "weights": [float(w) for w in choice.weights],
                     "parameters": dict(choice.params)}
            trial.set_user_attr("refused", err.message)
        else:
            live.load(result, adapters)
            score = scorer.score(result)
            merge = {"method": choice.method, "weights": list(result.report["weights"]),
                     "parameters": result.report["parameters"]}
        values = {o.name: v for o, v in zip(scorer.objectives, score.values, strict=False)}
        trial.set_user_attr("merge", merge)
        trial.set_user_attr("values", values)
        record_constraints(trial, scorer.constraint_names, score.constraints)
        trial.set_user_attr("checks", score.checks)
        if on_trial is not None:
            on_trial(_row(_Frozen(trial.number, trial.user_attrs)))
        return list(score.values)

    return objective


@dataclass(frozen=True)
class _Frozen:
    number: int
    user_attrs: dict[str, Any]


def _evaluate(store: Store, versions: Sequence[Version], policy: Any, space: SearchSpace,
              settings: SearchSettings, base: Path, target: str, study: Any, work: Path,
              on_trial: Callable[[TrialRow], None] | None) -> tuple[Scorer, int]:
    """Load everything once, score the baselines, run this worker's trials."""
    from gate.evaluate import Evaluator
    from merging.lora.live import LiveLora, rank_bound
    from merging.lora.merge_versions import load_stored
    from merging.targeting import check_output_layer
    from registry.formats.architecture import output_layer

    adapters = [load_stored(store, v, work / f"input-{i}") for i, v in enumerate(versions)]
    labels = [f"{v.name}@{v.short}" for v in versions]
    if study_full(study, settings.trials):  # nothing to evaluate: no model is loaded
        idle = Scorer(policy, None, None, [(v.name, a) for v, a in zip(versions, adapters, strict=True)],
                      store=store, name=target, base_dir=base, workdir=work)
        # the baselines the evaluating workers scored, so the trials blob (and with it the
        # pick's version digest) is the same whichever worker pushes
        idle.baselines.update(study.user_attrs.get(BASELINES_KEY) or {})
        return idle, 0
    evaluator = Evaluator(base, dtype=policy.dtype, seed=policy.seed, max_length=policy.max_length,
                          device=settings.device)
    output = output_layer(evaluator.base())
    for adapter in adapters:  # all-linear leaves the output layer out: PEFT would ignore it
        check_output_layer(adapter.path, adapter.config, adapter.infos, output)
    live = LiveLora.attach(evaluator.base(), rank_bound(adapters))
    scorer = Scorer(policy, evaluator, live, [(v.name, a) for v, a in zip(versions, adapters, strict=True)],
                    store=store, name=target, base_dir=base, workdir=work)
    scorer.prepare()
    # deterministic (same base, policy and data for every worker): a later worker joining a
    # full study reads them back instead of loading a model to score them again
    study.set_user_attr(BASELINES_KEY, dict(scorer.baselines))
    objective = _objective(scorer, space, adapters, labels, live, settings.seed, on_trial,
                           settings.device)
    evaluated = run_worker(study, objective, settings.trials)
    return scorer, evaluated


def _trials_blob(store: Store, name: str, settings: SearchSettings, scorer: Scorer,
                 rows: Sequence[TrialRow], space: SearchSpace) -> str:
    doc = {"study": name, "sampler": {"name": settings.sampler, "seed": settings.seed},
           "space": space.to_json(),
           "objectives": [{"name": o.name, "direction": o.direction} for o in scorer.objectives],
           "constraints": scorer.constraint_names, "baselines": scorer.baselines,
           "trials": [r.to_json() for r in rows]}
    return store.put_bytes(canonical_json(doc))


def _push_pick(store: Store, versions: Sequence[Version], row: TrialRow, target: str, work: Path,
               settings: SearchSettings, warnings: Sequence[str], search: dict[str, Any]
               ) -> PushResult:
    from merging.lora.engine import merge_adapters
    from merging.lora.publish import push_merge

    labels = [f"{v.name}@{v.short}" for v in versions]
    inputs = [work / f"input-{i}" for i in range(len(versions))]
    result = merge_adapters(inputs, list(row.weights), row.method, params=dict(row.parameters),
                            seed=settings.seed, labels=labels, device=settings.device)
    return push_merge(store, versions, result, target, work_dir=work, method=row.method,
                      warnings=warnings, allow_base_mismatch=settings.allow_base_mismatch,
                      extra_report={"search": search})


def run_search(store: Store, refs: Sequence[str], base_dir: str | Path, policy_path: str | Path,
               settings: SearchSettings = SearchSettings(), *,
               on_trial: Callable[[TrialRow], None] | None = None) -> SearchResult:
    """Run (or join) a merge search and push its pick (see module docstring).

    Raises:
        BadInputError: Fewer than two inputs, a bad policy, space, pick rule, storage or
            trial count; a policy without retention/perplexity checks.
        BaseMismatchError: Inputs of different bases, or a --base that is not theirs.
        UnsupportedAdapterError: Inputs the live model cannot take (modules_to_save, ...).
        NotFoundError: Unknown refs.
    """
    import optuna

    from gate.policy import load_policy
    from merging.lora.inputs import check_bases
    from registry.storage.refs import validate_name

    if len(refs) < 2:
        raise BadInputError("merge-search needs at least two adapters",
                            fix="adapters merge-search A B --base DIR --policy gate.yaml")
    if settings.trials < 1:
        raise BadInputError(f"--trials must be >= 1, got {settings.trials}", fix="e.g. --trials 20")
    check_rule(settings.pick_rule)
    base = Path(base_dir).expanduser()
    if not base.is_dir():
        raise NotFoundError(f"base model directory {base} not found",
                            fix="pass --base with a local transformers model directory")
    versions = [store.resolve(ref) for ref in refs]
    labels = [f"{v.name}@{v.short}" for v in versions]
    warnings = check_bases([v.record.get("base_model") for v in versions], labels,
                           allow_weights_mismatch=settings.allow_base_mismatch)
    check_base_dir(base, versions, allow_weights_mismatch=settings.allow_base_mismatch)
    policy = load_policy(policy_path)
    sets = [label for spec in policy.checks if spec.kind == "retention" for label in spec["sets"]]
    if settings.pick_rule.startswith("retention:") and settings.pick_rule[10:] not in sets:
        raise BadInputError(f"--pick {shorten(settings.pick_rule)}: the policy has no retention set "
                            f"{shorten(settings.pick_rule[10:])}",  # refused before the search, not after
                            fix="use one of " + ", ".join(f"retention:{label}" for label in sets))
    space = build_space(len(versions), settings.methods, settings.space_file)
    target = settings.name or f"{versions[0].name}-search"
    validate_name(target)
    name = settings.study or study_name(versions, policy.digest, space, settings)
    # ERROR: a trial that raises is logged by Optuna as a WARNING with its traceback; the
    # error reaches the user once, as the CLI's one-line message
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(settings.storage, settings.heartbeat)
    with leased_temp_dir(store.root / "tmp", "search-") as work:  # gc leaves it alone
        scorer_directions = _directions(policy, versions)
        sampler = make_sampler(settings.sampler, settings.seed, settings.trials)
        study, created = open_study(storage, name, scorer_directions, sampler,
                                    search_identity(versions, policy.digest, space, settings))
        enqueue_defaults(study, space.defaults(), created=created)
        scorer, evaluated = _evaluate(store, versions, policy, space, settings, base, target,
                                      study, work, on_trial)
        rows, beyond = _complete_rows(study, settings.trials)
        directions = {o.name: o.direction for o in scorer.objectives}
        front = tuple(pareto_front(rows, directions))
        picked = pick(rows, settings.pick_rule)
        digest, pushed, notes = _publish(store, versions, rows, picked, target, work, settings,
                                         warnings, scorer, space, name, policy.digest)
        if beyond > 0:
            notes.append(f"the study holds {beyond} more complete trials than --trials "
                         f"{settings.trials}; only its first {settings.trials} were considered")
    plot = None
    if settings.plot is not None:
        note = plot_front(rows, front, picked, Path(settings.plot))
        plot = None if note else str(settings.plot)
        if note:
            notes.append(note)
    return SearchResult(study=name, sampler=settings.sampler, seed=settings.seed,
                        storage=settings.storage, budget=settings.trials,
                        objectives=tuple(scorer.objectives), constraints=tuple(scorer.constraint_names),
                        rows=rows, front=front, picked=picked, evaluated=evaluated,
                        baselines=dict(scorer.baselines), space=space.to_json(),
                        optuna_version=optuna.__version__, pushed=pushed, trials_digest=digest,
                        plot=plot, notes=tuple(notes))


def _complete_rows(study: Any, budget: int) -> tuple[tuple[TrialRow, ...], int]:
    """The study's first ``budget`` COMPLETE trials by number (a study saved with a larger
    budget holds more), and how many were left out."""
    import optuna

    rows = sorted((_row(t) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))), key=lambda r: r.number)
    return tuple(rows[:budget]), max(0, len(rows) - budget)


def _publish(store: Store, versions: Sequence[Version], rows: Sequence[TrialRow],
             picked: TrialRow | None, target: str, work: Path, settings: SearchSettings,
             warnings: Sequence[str], scorer: Scorer, space: SearchSpace, name: str,
             policy_digest: str) -> tuple[str | None, PushResult | None, list[str]]:
    """Push the pick once the study is full: ``(trials digest, push result, notes)``."""
    import optuna

    if len(rows) < settings.trials:
        return None, None, [f"the study holds {len(rows)} of {settings.trials} trials; another "
                            "worker is still running (it pushes the pick), or run this again"]
    if picked is None or not settings.push:
        return None, None, []
    digest = _trials_blob(store, name, settings, scorer, rows, space)
    search = {"study": name, "sampler": settings.sampler, "seed": settings.seed,
              "trials": len(rows), "trial": picked.number, "pick": settings.pick_rule,
              "objectives": picked.values, "policy": policy_digest, "trials_digest": digest,
              "optuna_version": optuna.__version__}
    return digest, _push_pick(store, versions, picked, target, work, settings, warnings, search), []


def _directions(policy: Any, versions: Sequence[Version]) -> list[str]:
    """Objective directions in :class:`Scorer` order, known before any model is loaded.

    Raises:
        BadInputError: No retention or perplexity check.
    """
    out = []
    for spec in policy.checks:
        if spec.kind == "retention":
            out += ["maximize"] * len(spec["sets"])
        elif spec.kind == "perplexity":
            out.append("minimize")
    if not out:
        raise BadInputError("the policy has no retention or perplexity check to optimise",
                            fix="add a retention check (one set per input) to the policy")
    return out
