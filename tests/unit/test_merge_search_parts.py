"""Parts of the merge search that need no trained model: the space and its bounds, the
front and pick rules, per-trial sampler seeds, and the live LoRA swap (exact against
PEFT's own loading of the same factors, on the tiny Llama of tests/support/cli.py)."""

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


def test_live_swap_equals_peft_loading_and_clear_is_the_base(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merging.adapter import load_adapter
    from merging.engine import merge_adapters
    from merging.live import LiveLora, rank_bound
    from merging.peft_output import write_peft_dir
    from tests.support.cli import build_tiny_peft

    base_dir, a_dir = tmp_path / "base", tmp_path / "a"
    build_tiny_peft(base_dir, a_dir, seed=1)
    build_tiny_peft(tmp_path / "base2", tmp_path / "b", seed=2)  # same base weights (seeded)
    adapters = [load_adapter(a_dir), load_adapter(tmp_path / "b")]
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
    live = LiveLora.attach(AutoModelForCausalLM.from_pretrained(base_dir).eval(), rank_bound(adapters))
    assert live.rank == 8
    with torch.no_grad():
        assert torch.equal(live.model(input_ids=ids).logits, base_logits)
        for method, params in (("ties", {"align": "knots"}), ("dare_ties", {}), ("cat", {})):
            result = merge_adapters(adapters, [0.7, 1.2], method, params=params)
            live.load(result, adapters)
            out = write_peft_dir(result, tmp_path / f"m-{method}")
            ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
            torch.testing.assert_close(live.model(input_ids=ids).logits, ref(ids).logits,
                                       atol=1e-5, rtol=1e-5)
        live.clear()
        assert torch.equal(live.model(input_ids=ids).logits, base_logits)
