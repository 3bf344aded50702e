"""breadcrumbs, breadcrumbs_ties, della, della_linear against references (KnOTS: test_knots.py).

References: the installed mergekit, called directly on the same dense deltas
(``sparsify.magnitude_outliers`` / ``della_magprune`` and the registered
``breadcrumbs``/``breadcrumbs_ties``/``della``/``della_linear`` merges on a zero
base), with our DELLA masks injected through ``torch.bernoulli`` and the paper's
``1/p`` rescaling applied to mergekit's masked tensors; PEFT's ``merge_utils`` for
the TIES-style (``sum``) election. A method sees a delta ``D`` as the factors
``B = I, A = D``.
"""

from __future__ import annotations

import pytest
import torch

from merging.lora import sparsify
from merging.lora.methods import METHODS, ModuleContext, get_method
from registry.errors import BadInputError
from tests.support.merge import (PAIR_ONLY_A, PAIR_SHAPES, as_inputs, lora_product, mergekit_merge,
                                 module_deltas, random_deltas, run)

merge_utils = pytest.importorskip("peft.utils.merge_utils")
mk_sparsify = pytest.importorskip("mergekit.sparsify")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")

NEW = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
ENTRY_WISE = sorted(n for n, m in METHODS.items() if m.output == "dense")


def test_registry_has_the_new_methods() -> None:
    assert set(NEW) <= set(METHODS)
    assert set(NEW) <= set(ENTRY_WISE)


# ---- breadcrumbs ----

@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0),
                                           (1.0, 0.3), (0.001, 0.1), (0.2, 0.85)])
def test_breadcrumbs_band_equals_mergekit_magnitude_outliers(density: float, gamma: float) -> None:
    delta = random_deltas(1, (70, 23), seed=1)[0]  # 70 rows: two row blocks
    ctx = ModuleContext("m", tuple(delta.shape), 0)
    inp = as_inputs([delta], [1.0])[0]
    lo, hi = sparsify.outlier_band(inp, density, gamma, ctx)
    ours = sparsify.band_block(delta.clone(), lo, hi)
    ref = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma)
    assert torch.equal(ours, ref)


def test_breadcrumbs_band_on_a_large_tensor() -> None:
    """Over 2^20 entries: both order statistics go through the sampled bracket."""
    delta = random_deltas(1, (1100, 1000), seed=2)[0]
    ctx = ModuleContext("m", tuple(delta.shape), 0)
    lo, hi = sparsify.outlier_band(as_inputs([delta], [1.0])[0], 0.4, 0.05, ctx)
    ours = sparsify.band_block(delta.clone(), lo, hi)
    assert torch.equal(ours, mk_sparsify.magnitude_outliers(delta, 0.4, gamma=0.05))


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_equals_mergekit(normalize: bool) -> None:
    deltas = random_deltas(3, (40, 30), seed=3)
    weights = [0.7, 1.3, -0.4]
    ours = run("breadcrumbs", deltas, weights, density=0.4, gamma=0.05, normalize=normalize,
               **{"lambda": 0.8})
    ref = mergekit_merge("breadcrumbs", deltas, weights, density=0.4, gamma=0.05,
                         normalize=normalize, rescale=False, lam=0.8)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_breadcrumbs_ties_mergekit_election_equals_mergekit() -> None:
    deltas = random_deltas(3, (40, 30), seed=4)
    weights = [0.2, 0.5, 1.5]
    ours = run("breadcrumbs_ties", deltas, weights, density=0.5, gamma=0.02,
               sign_election="mergekit")
    ref = mergekit_merge("breadcrumbs_ties", deltas, weights, density=0.5, gamma=0.02,
                         normalize=True, rescale=False)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("election,peft_mode", [("sum", "total"), ("frequency", "frequency")])
def test_breadcrumbs_ties_peft_elections(election: str, peft_mode: str) -> None:
    """mergekit's crumbs, then PEFT's sign election and disjoint merge (TIES without its trim)."""
    deltas = random_deltas(3, (24, 40), seed=5)
    weights = [0.7, 1.3, -0.4]
    ours = run("breadcrumbs_ties", deltas, weights, density=0.3, gamma=0.1, sign_election=election)
    crumbs = torch.stack([mk_sparsify.magnitude_outliers(d, 0.3, gamma=0.1) for d in deltas])
    weighted = crumbs * torch.tensor(weights).reshape(-1, 1, 1)
    mask = merge_utils.calculate_majority_sign_mask(crumbs, method=peft_mode)
    ref = merge_utils.disjoint_merge(weighted, mask)
    assert torch.allclose(ours, ref, atol=1e-6)


# ---- DELLA ----

def _inject(monkeypatch, masks, seen):  # type: ignore[no-untyped-def]
    """mergekit draws our masks (in input order); the probabilities it asked for go to ``seen``."""
    queue = list(masks)

    def fake_bernoulli(probabilities, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(probabilities.clone())
        return queue.pop(0).clone()

    monkeypatch.setattr(mk_sparsify.torch, "bernoulli", fake_bernoulli)
    return queue


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.1), (0.8, 0.0), (0.6, 0.39)])
def test_della_masks_equal_mergekit_della_magprune(monkeypatch, density: float,
                                                   epsilon: float) -> None:
    delta = random_deltas(1, (150, 37), seed=6)[0]  # three row blocks
    ctx = ModuleContext("layer.v", tuple(delta.shape), 11)
    inp = as_inputs([delta], [1.0])[0]
    mask, probs = sparsify.della_mask(inp, ctx, density, epsilon)
    seen: list[torch.Tensor] = []
    queue = _inject(monkeypatch, [mask], seen)
    masked = mk_sparsify.della_magprune(delta, density, epsilon, rescale_norm=None)
    assert not queue
    assert torch.equal(seen[0], probs)  # same ranking, same probabilities, bit for bit
    assert float(probs.min()) == pytest.approx(density - epsilon)
    assert float(probs.max()) == pytest.approx(density + epsilon)
    # the method's transform: mergekit's masked tensor rescaled by 1/p (the paper's MAGPRUNE)
    ours = run("della_linear", [delta], [1.0], name="layer.v", seed=11, density=density,
               epsilon=epsilon)
    assert torch.allclose(ours, masked / probs, atol=1e-6)
    assert abs(float(mask.mean()) - density) < 0.05


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_ranks_rows_of_the_stored_weight_for_transposed_modules(monkeypatch, method: str) -> None:
    # embeddings and fan_in_fan_out layers store (B A)^T, and mergekit ranks the rows of the
    # stored tensor: found by a QA pass, DELLA ranked the rows of B A (columns of the weight)
    deltas = random_deltas(2, (37, 150), seed=8)  # B A; the stored weights are (150, 37)
    spec = get_method(method)
    params = spec.resolve({"density": 0.5, "epsilon": 0.3}, [1.0, 0.7])
    ctx = ModuleContext("model.embed_tokens", (37, 150), 3, transposed=True)
    ours = spec.fn(as_inputs(deltas, [1.0, 0.7]), params, ctx)
    stored = run(method, [d.T.contiguous() for d in deltas], [1.0, 0.7], name="model.embed_tokens",
                 seed=3, density=0.5, epsilon=0.3)
    assert torch.equal(ours, stored.T)
    # one input, weight 1: a kept entry is d / p, and p is mergekit's for the stored weight's rows
    single = get_method("della_linear").fn(as_inputs(deltas[:1], [1.0]), params, ctx)
    mask, probs = sparsify.della_mask(as_inputs([deltas[0].T.contiguous()], [1.0])[0],
                                      ModuleContext("model.embed_tokens", (150, 37), 3), 0.5, 0.3)
    seen: list[torch.Tensor] = []
    _inject(monkeypatch, [mask], seen)
    mk_sparsify.della_magprune(deltas[0].T.contiguous(), 0.5, 0.3, rescale_norm=None)
    kept = single != 0
    assert torch.allclose((deltas[0] / single)[kept], seen[0].T[kept], atol=1e-5)


@pytest.mark.parametrize("method,params", [("della", {"sign_election": "mergekit"}),
                                           ("della_linear", {}),
                                           ("della_linear", {"normalize": True})])
def test_della_merges_equal_mergekit(monkeypatch, method: str, params: dict) -> None:
    deltas = random_deltas(3, (90, 33), seed=7)
    weights = [0.6, 1.1, 0.3]
    ctx = ModuleContext("q", (90, 33), 5)
    masks = [sparsify.della_mask(inp, ctx, 0.4, 0.2) for inp in as_inputs(deltas, weights)]
    ours = run(method, deltas, weights, name="q", seed=5, density=0.4, epsilon=0.2,
               **{"lambda": 1.3}, **params)
    real = mk_gta.sparsify

    def paper_rescaled(tensor, density, method, gamma=0, epsilon=0, rescale_norm=None):  # type: ignore[no-untyped-def]
        seen: list[torch.Tensor] = []
        monkeypatch.setattr(mk_sparsify.torch, "bernoulli",
                            lambda p: seen.append(p.clone()) or masks.pop(0)[0].clone())
        masked = real(tensor, density, method, gamma=gamma, epsilon=epsilon, rescale_norm=None)
        return masked / seen[0]

    monkeypatch.setattr(mk_gta, "sparsify", paper_rescaled)
    ref = mergekit_merge(method, deltas, weights, density=0.4, epsilon=0.2, lam=1.3,
                         normalize=params.get("normalize", method == "della"), rescale=False)
    assert not masks
    assert torch.allclose(ours, ref, atol=1e-5)


def test_della_sum_election_equals_peft_disjoint_merge() -> None:
    deltas = random_deltas(2, (70, 20), seed=8)
    weights = [1.0, 0.5]
    ctx = ModuleContext("k", (70, 20), 2)
    parts = []
    for inp in as_inputs(deltas, weights):
        mask, probs = sparsify.della_mask(inp, ctx, 0.5, 0.1)
        parts.append(inp.A * mask / probs)
    stacked = torch.stack(parts)
    ref = merge_utils.disjoint_merge(stacked * torch.tensor(weights).reshape(-1, 1, 1),
                                     merge_utils.calculate_majority_sign_mask(stacked, "total"))
    ours = run("della", deltas, weights, name="k", seed=2, density=0.5, epsilon=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_deterministic_for_a_seed(method: str) -> None:
    deltas = random_deltas(2, (130, 21), seed=9)
    torch.manual_seed(123)
    a = run(method, deltas, [1.0, 1.0], seed=4, density=0.3, epsilon=0.1)
    torch.manual_seed(456)  # the global RNG does not matter
    b = run(method, deltas, [1.0, 1.0], seed=4, density=0.3, epsilon=0.1)
    c = run(method, deltas, [1.0, 1.0], seed=5, density=0.3, epsilon=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_row_ranks_are_the_stable_double_argsort() -> None:
    x = torch.randn(70, 45)
    x[:, ::4] = 0.5  # ties within rows
    x[::3, 1::4] = -0.5  # ties across signs
    x[5] = 0.0
    ref = torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1).float() + 1
    assert torch.equal(sparsify.row_ranks(x), ref)


def test_della_density_one_and_one_column() -> None:
    deltas = random_deltas(2, (10, 12), seed=10)
    assert torch.allclose(run("della_linear", deltas, [1.0, 2.0], density=1.0, epsilon=0.3),
                          deltas[0] + 2 * deltas[1], atol=1e-6)
    column = torch.randn(5, 1)
    probs = sparsify.della_probabilities(column, 0.4, 0.1)
    assert torch.equal(probs, torch.full((5, 1), 0.4))


# ---- parameters ----

@pytest.mark.parametrize("method,given,message", [
    ("breadcrumbs", {"gamma": 1.0}, "gamma must be in [0, 1)"),
    ("breadcrumbs_ties", {"gamma": -0.1}, "gamma must be in [0, 1)"),
    ("breadcrumbs", {"gamma": float("nan")}, "gamma must be in [0, 1)"),
    ("breadcrumbs", {"gamma": True}, "gamma must be in [0, 1)"),
    ("della", {"epsilon": -0.1}, "epsilon must be in [0, 1)"),
    ("della", {"epsilon": 0.5}, "density ± epsilon must lie in (0, 1)"),
    ("della_linear", {"density": 0.9}, "density ± epsilon must lie in (0, 1)"),  # default 0.15
    ("della_linear", {"density": 0.2, "epsilon": 0.2}, "density ± epsilon must lie in (0, 1)"),
    ("della", {"density": 0}, "density must be in (0, 1]"),
    ("ties", {"gamma": 0.1}, "--gamma does not apply to method ties"),
    ("breadcrumbs", {"epsilon": 0.1}, "--epsilon does not apply to method breadcrumbs"),
    ("della", {"sign_election": "vote"}, "unknown sign election"),
    ("ties", {"align": "svd"}, "unknown alignment"),
    ("linear", {"align": "knots"}, "--align does not apply to method linear"),
    ("cat", {"align": "knots"}, "--align does not apply to method cat"),
])
def test_bad_parameters_refused(method: str, given: dict, message: str) -> None:
    with pytest.raises(BadInputError) as info:
        get_method(method).resolve(given, [1.0, 1.0])
    assert message in info.value.message and "\n" not in info.value.message
    if "--align" in message:
        assert "ties" in (info.value.fix or "")


def test_parameters_resolved_and_recorded() -> None:
    della = get_method("della")
    params = della.resolve({"density": 1.0, "epsilon": 0.7}, [1.0])  # density 1: epsilon unused
    assert params.epsilon == 0.7
    assert della.recorded(della.resolve({}, [1.0])) == {
        "density": 0.5, "lambda": 1.0, "sign_election": "sum", "epsilon": 0.15}
    crumbs = get_method("breadcrumbs")
    assert crumbs.recorded(crumbs.resolve({"gamma": 0.0}, [1.0])) == {
        "density": 0.5, "lambda": 1.0, "normalize": False, "gamma": 0.0}
    ties = get_method("ties")
    assert ties.recorded(ties.resolve({"align": "knots"}, [1.0]))["align"] == "knots"
    assert "align" not in ties.recorded(ties.resolve({}, [1.0]))  # older recipes unchanged
    for name in ENTRY_WISE:
        get_method(name).resolve({"align": "knots"}, [1.0, 1.0])


# ---- the engine on hand-made adapters: mixed ranks, a module only one input has ----

@pytest.mark.parametrize("method", NEW)
def test_engine_runs_the_new_methods(adapter_pair, method: str) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters

    a, b = adapter_pair
    extra = {"epsilon": 0.1} if "della" in method else {"gamma": 0.05}
    res = merge_adapters([a, b], [0.6, 0.4], method, params={"density": 0.5, **extra},
                         rank="full", seed=1)
    da, db = module_deltas(a, PAIR_SHAPES), module_deltas(b, PAIR_SHAPES)
    name = "model.layers.0.self_attn.q_proj"
    expected = run(method, [da[name], db[name]], [0.6, 0.4], name=f"base_model.model.{name}",
                   seed=1, density=0.5, **extra)
    assert torch.allclose(lora_product(res, name), expected, atol=1e-5)
    alone = run(method, [da[PAIR_ONLY_A]], [0.6], name=f"base_model.model.{PAIR_ONLY_A}", seed=1,
                density=0.5, **extra)  # the module only a has: b contributes nothing
    assert torch.allclose(lora_product(res, PAIR_ONLY_A), alone, atol=1e-5)
    assert res.report["modules"][f"base_model.model.{PAIR_ONLY_A}"]["inputs"] == [0]
    again = merge_adapters([a, b], [0.6, 0.4], method, params={"density": 0.5, **extra},
                           rank="full", seed=1)
    assert all(torch.equal(again.tensors[k], v) for k, v in res.tensors.items())
