"""Parts of the merge search that need no trained model: the space and its bounds, the
front and pick rules, the plot (and its message without matplotlib), per-trial sampler
seeds, and the live in-place merge (bit-identical to the gate's own model for the same
merge, base restored exactly; on the tiny Llama of tests/support/cli.py)."""

from __future__ import annotations

import pytest

from gate.search.front import TrialRow, check_rule, pareto_front, pick
from gate.search.space import build_space
from gate.search.study import trial_seed
from registry.errors import BadInputError


class _Trial:
    """A stand-in for optuna.Trial: suggestions from a fixed table (else the low end)."""

    def __init__(self, values: dict) -> None:
        self.values, self.asked = values, []

    def suggest_float(self, name, low, high):
        self.asked.append(name)
        return self.values.get(name, low)

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return self.values.get(name, choices[0])


def test_space_suggests_only_what_the_method_declares():
    space = build_space(2, ["ties", "breadcrumbs_ties", "della", "task_arithmetic"])
    ties = space.suggest(_Trial({"method": "ties", "align": "knots"}))
    assert set(ties.params) == {"density", "lambda", "sign_election", "align"}
    assert ties.params["align"] == "knots" and len(ties.weights) == 2
    crumbs = space.suggest(_Trial({"method": "breadcrumbs_ties"}))
    assert "gamma" in crumbs.params and "epsilon" not in crumbs.params
    linear = _Trial({"method": "task_arithmetic"})
    ta = space.suggest(linear)
    assert set(ta.params) == {"lambda"} and "align" not in linear.asked  # not entry-wise
    della = space.suggest(_Trial({"method": "della", "density": 0.1, "epsilon": 0.2}))
    assert della.params["epsilon"] == pytest.approx(0.95 * 0.1)  # clipped: density ± eps in (0, 1)


def test_space_file_overrides_fixes_and_is_bounded_by_the_methods(tmp_path):
    good = tmp_path / "space.yaml"
    good.write_text("methods: [dare_ties]\ndensity: [0.3, 0.6]\nlambda: 1.0\nalign: [none]\n")
    space = build_space(2, None, good)
    assert space.methods == ("dare_ties",)
    trial = _Trial({})
    choice = space.suggest(trial)
    assert choice.params["lambda"] == 1.0 and "lambda" not in trial.asked and "align" not in trial.asked
    assert "method" not in trial.asked and choice.params["density"] == 0.3
    for text, field in (("density: [0.0, 0.5]\n", "density"), ("gamma: [0.5, 1.0]\n", "gamma"),
                        ("colour: 3\n", "colour"), ("density: [0.9, 0.2]\n", "density"),
                        ("align: [svd]\n", "align"), ("weights: [a, b]\n", "weights")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(BadInputError) as err:
            build_space(2, ["ties", "breadcrumbs"], bad)
        assert field in err.value.message
    with pytest.raises(BadInputError):
        build_space(2, ["no_such_method"])


def test_per_input_weight_rows_w0_w1(tmp_path):
    # found by a QA pass: the README documents w0, w1 rows, and the space refused them
    path = tmp_path / "space.yaml"
    path.write_text("weights: [0.5, 1.0]\nw1: 0.8\n")
    space = build_space(2, ["ties"], path)
    trial = _Trial({})
    choice = space.suggest(trial)
    assert choice.weights == (0.5, 0.8) and "w0" in trial.asked and "w1" not in trial.asked
    assert space.defaults()[0]["w0"] == 1.0 and "w1" not in space.defaults()[0]
    for text in ("w2: [0.1, 0.2]\n", "w0: [1.0, 0.5]\n", "methods: []\n"):
        path.write_text(text)
        with pytest.raises(BadInputError, match="w2|w0|methods"):
            build_space(2, None, path)


def test_defaults_are_each_methods_hand_merge():
    space = build_space(2, ["ties", "dare_ties"])
    assert space.defaults()[0] == {"method": "ties", "w0": 1.0, "w1": 1.0, "density": 0.5,
                                   "lambda": 1.0, "sign_election": "sum", "align": "none"}


def _row(n: int, a: float, b: float, ppl: float, ok: bool = True) -> TrialRow:
    return TrialRow(number=n, method="ties", weights=(1.0, 1.0), parameters={},
                    values={"perplexity:p": ppl, "retention:a": a, "retention:b": b},
                    constraints=(0.0 if ok else 0.5,), checks={})


def test_front_and_pick_rules():
    rows = [_row(0, 1.0, 0.5, 10), _row(1, 0.8, 0.8, 12), _row(2, 0.9, 0.9, 11, ok=False),
            _row(3, 0.7, 0.7, 9), _row(4, 0.8, 0.8, 12)]
    directions = {"perplexity:p": "minimize", "retention:a": "maximize", "retention:b": "maximize"}
    assert [r.number for r in pareto_front(rows, directions)] == [0, 1, 3, 4]  # 2 is infeasible
    assert pick(rows).number == 1                      # best worst case; 4 ties it, higher number
    assert pick(rows, "perplexity").number == 3
    assert pick(rows, "retention:a").number == 0
    assert pick(rows, "trial:4").number == 4
    with pytest.raises(BadInputError):
        pick(rows, "trial:2")                           # infeasible
    with pytest.raises(BadInputError):
        pick(rows, "retention:c")
    assert pick([_row(0, 1, 1, 1, ok=False)]) is None
    for rule in ("best", "trial:x", "retention:"):
        with pytest.raises(BadInputError):
            check_rule(rule)


def test_trial_seeds_depend_on_seed_and_number_only():
    assert trial_seed(0, 3) == trial_seed(0, 3)
    assert len({trial_seed(0, n) for n in range(50)} | {trial_seed(1, 0)}) == 51


def _rows():
    return [TrialRow(number=n, method="ties", weights=(1.0, 1.0), parameters={"align": "knots"},
                     values={"retention:a": r, "perplexity:p": ppl}, constraints=(c,), checks={})
            for n, (r, ppl, c) in enumerate([(0.9, 10.0, 0.0), (0.8, 9.0, 0.0), (0.5, 12.0, 1.0),
                                             (0.1, 1e9, 1.0)])]


def test_plot_without_matplotlib_says_so_and_writes_nothing(tmp_path, monkeypatch):
    import sys

    from gate.search.front import plot_front

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = _rows()
    note = plot_front(rows, rows[:2], rows[0], tmp_path / "front.png")
    assert note == "matplotlib is not installed; no plot written (pip install matplotlib)"
    assert not (tmp_path / "front.png").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from gate.search.front import plot_front

    rows = _rows()
    out = tmp_path / "sub" / "front.png"
    assert plot_front(rows, rows[:2], rows[0], out) is None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    pixels = imread(out)  # read back: a real picture, not an empty canvas
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 200
    assert float(pixels[..., :3].std()) > 0.01


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_live_merge_is_bit_identical_to_the_gates_model_and_clear_restores_w0(tmp_path, dtype):
    """The live model's weights after a swap are exactly those of the model the gate
    scores for the same merge (base + written PEFT dir, merge_and_unload), for merge
    results and for a parent on its own; clear() gives the base weights back bit for bit."""
    import torch

    from gate.evaluate import Evaluator
    from merging.adapter import load_adapter
    from merging.lora.engine import merge_adapters
    from merging.lora.live import LiveLora, rank_bound
    from merging.lora.peft_output import write_peft_dir
    from tests.support.cli import build_tiny_peft

    base_dir, a_dir = tmp_path / "base", tmp_path / "a"
    build_tiny_peft(base_dir, a_dir, seed=1)
    build_tiny_peft(tmp_path / "base2", tmp_path / "b", seed=2)  # same base weights (seeded)
    adapters = [load_adapter(a_dir), load_adapter(tmp_path / "b")]

    def gate_model(key: str, path):  # what `adapters gate` scores: base + PEFT dir, merged
        return Evaluator(base_dir, dtype=dtype).with_adapter(key, path)

    base_state = {k: v.clone() for k, v in Evaluator(base_dir, dtype=dtype).base().state_dict().items()}
    live = LiveLora.attach(Evaluator(base_dir, dtype=dtype).base(), rank_bound(adapters))
    assert live.rank == 8

    def same_weights(expected: dict) -> bool:
        got = live.model.state_dict()
        return set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    for method, params in (("ties", {"align": "knots"}), ("dare_ties", {}), ("cat", {})):
        result = merge_adapters(adapters, [0.7, 1.2], method, params=params)
        live.load(result, adapters)
        assert same_weights(gate_model("c", write_peft_dir(result, tmp_path / f"m-{method}")).state_dict())
        assert not same_weights(base_state)
    live.load_adapter(adapters[1])
    assert same_weights(gate_model("p", tmp_path / "b").state_dict())
    live.clear()
    assert same_weights(base_state)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        assert torch.equal(live.model(input_ids=ids).logits,
                           Evaluator(base_dir, dtype=dtype).base()(input_ids=ids).logits)


def test_live_merge_refuses_factors_that_do_not_fit(tmp_path):
    import torch

    from gate.evaluate import Evaluator
    from merging.adapter import load_adapter
    from merging.lora.live import LiveLora, rank_bound
    from registry.errors import UnsupportedAdapterError
    from tests.support.cli import build_tiny_peft

    build_tiny_peft(tmp_path / "base", tmp_path / "a", seed=1)
    adapter = load_adapter(tmp_path / "a")
    live = LiveLora.attach(Evaluator(tmp_path / "base").base(), rank_bound([adapter]))
    name = next(iter(live.modules))
    before = {k: v.clone() for k, v in live.model.state_dict().items()}
    with pytest.raises(UnsupportedAdapterError, match="do not fit"):
        live.load_factors({name: (torch.ones(3, 2), torch.ones(2, 5), 1.0)})
    with pytest.raises(UnsupportedAdapterError, match="not in the live model"):
        live.load_factors({"base_model.model.nowhere": (torch.ones(1, 1), torch.ones(1, 1), 1.0)})
    live.clear()
    assert all(torch.equal(v, before[k]) for k, v in live.model.state_dict().items())


def test_live_merge_of_embedding_adapters_is_bit_identical(tmp_path):
    """An Embedding's delta is PEFT's ``(B @ A).T * s`` rounded to the weight's dtype
    before the add (a Linear's is added in float32): bfloat16 tells the two apart."""
    import torch
    from peft import LoraConfig, get_peft_model

    from gate.evaluate import Evaluator
    from merging.adapter import load_adapter
    from merging.lora.engine import merge_adapters
    from merging.lora.live import LiveLora, rank_bound
    from merging.lora.peft_output import write_peft_dir
    from tests.support.tiny_llama import tiny_llama

    for seed in (1, 2):
        base = tiny_llama()
        base.save_pretrained(tmp_path / "base")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["embed_tokens", "q_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen))
        model.save_pretrained(tmp_path / f"a{seed}", save_embedding_layers=False)
    adapters = [load_adapter(tmp_path / "a1"), load_adapter(tmp_path / "a2")]
    live = LiveLora.attach(Evaluator(tmp_path / "base", dtype="bfloat16").base(), rank_bound(adapters))
    assert any(isinstance(m, torch.nn.Embedding) for m in live.modules.values())
    for method in ("ties", "cat"):
        result = merge_adapters(adapters, [0.7, 1.2], method)
        live.load(result, adapters)
        expected = Evaluator(tmp_path / "base", dtype="bfloat16").with_adapter(
            "c", write_peft_dir(result, tmp_path / method)).state_dict()
        got = live.model.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_storage_failing_under_the_trials_is_an_environment_failure():
    # found by a resource-exhaustion pass: a full disk under an sqlite study failed a commit
    # (StorageInternalError), optuna then raised AssertionError("Should not reach."): exit 70
    from optuna.exceptions import StorageInternalError

    from gate.search.study import storage_failure

    try:
        try:
            raise StorageInternalError("An exception is raised during the commit: (sqlite3."
                                       "OperationalError) database or disk is full")
        except StorageInternalError:
            raise AssertionError("Should not reach.")  # noqa: B904 - optuna's own, unchained
    except AssertionError as err:
        failure = storage_failure(err)
    assert failure is not None and failure.exit_code == 6
    assert "database or disk is full" in failure.message and "finished trials" in failure.fix
    assert storage_failure(AssertionError("a real bug")) is None
    assert storage_failure(ValueError("bad value")) is None


def test_a_full_disk_when_the_storage_is_opened_is_exit_6(tmp_path, monkeypatch):
    from gate.search import study
    from registry.errors import EnvironmentFailure

    def full(*_args, **_kwargs):
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(study, "_storage_class", lambda: full)
    with pytest.raises(EnvironmentFailure, match="database or disk is full"):
        study.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=30)


def test_the_objectives_own_errors_keep_their_exit_codes_whatever_their_text():
    # found by a review: an IntegrityError naming a version "readonly-exp" became "the study
    # storage failed" (exit 6) because its text held a storage word
    import optuna

    from gate.search.study import run_worker
    from registry.errors import IntegrityError

    study = optuna.create_study(directions=["maximize"])

    def objective(trial):
        raise IntegrityError("blob of readonly-exp@sha256:ab does not match its digest", fix="verify")

    with pytest.raises(IntegrityError, match="readonly-exp"):
        run_worker(study, objective, 2)


def test_a_default_whose_every_trial_failed_is_queued_again_on_rejoin() -> None:
    """Found by a QA pass: a Ctrl-C'd default trial is marked FAIL, and Optuna's retry only
    covers trials whose heartbeat stopped, so the hand-made recipe was never run again."""
    import optuna
    from optuna.trial import TrialState

    from gate.search.study import enqueue_defaults

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=["maximize"])
    defaults = [{"method": "ties", "density": 0.5}, {"method": "dare_ties", "density": 0.5}]
    assert enqueue_defaults(study, defaults, created=True) == 2
    assert enqueue_defaults(study, defaults, created=True) == 2  # skip_if_exists: still two
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    first = study.ask()  # the interrupted one
    study.tell(first, state=TrialState.FAIL)
    second = study.ask()
    study.tell(second, [1.0])
    assert enqueue_defaults(study, defaults, created=False) == 1
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [defaults[0]]
    assert enqueue_defaults(study, defaults, created=False) == 0  # queued already: not twice
