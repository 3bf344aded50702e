"""Merge methods on hand-made deltas against independent references.

References: ``peft.utils.merge_utils`` (ties, dare_linear, dare_ties,
magnitude_prune, task_arithmetic) fed the very same dense deltas (and, for DARE,
the same keep-masks, injected through ``torch.bernoulli``), and a small
re-statement of mergekit's TIES (``sparsify.magnitude`` + ``get_mask`` on
weighted deltas + division by the agreeing weights, from mergekit 0.1.5's
``generalized_task_arithmetic.py``). A method sees a delta ``D`` as the factors
``B = I, A = D``, whose product is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from merging.lora import sparsify
from merging.lora.methods import METHODS, MergeParams, ModuleContext, ModuleInput, get_method
from registry.errors import BadInputError
from tests.support.merge import random_deltas, run

merge_utils = pytest.importorskip("peft.utils.merge_utils")
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed")

# The README's worked example: two 2x3 deltas, density 0.5, weights 1 and 0.5.
D1 = torch.tensor([[0.8, -0.7, 0.3], [0.1, 0.2, -0.9]])
D2 = torch.tensor([[0.4, 0.6, -0.2], [0.05, -0.7, 0.3]])
W = [1.0, 0.5]


def test_registry_lists_every_method() -> None:
    assert sorted(METHODS) == ["breadcrumbs", "breadcrumbs_ties", "cat", "dare_linear", "dare_ties",
                               "della", "della_linear", "linear", "magnitude_prune",
                               "task_arithmetic", "ties"]
    with pytest.raises(BadInputError, match="unknown merge method"):
        get_method("slerp")


# ---- the README's worked examples, by hand ----

def test_worked_example_ties_sum() -> None:
    expected = torch.tensor([[0.5, -0.7, 0.0], [0.0, -0.35, -0.9]])
    assert torch.allclose(run("ties", [D1, D2], W, density=0.5), expected, atol=1e-6)


def test_worked_example_ties_frequency() -> None:
    expected = torch.tensor([[0.5, 0.3, 0.0], [0.0, -0.35, -0.9]])
    got = run("ties", [D1, D2], W, density=0.5, sign_election="frequency")
    assert torch.allclose(got, expected, atol=1e-6)


def test_worked_example_ties_mergekit() -> None:
    expected = torch.tensor([[1.0 / 1.5, -0.7, 0.0], [0.0, -0.7, -0.9]])
    got = run("ties", [D1, D2], W, density=0.5, sign_election="mergekit")
    assert torch.allclose(got, expected, atol=1e-6)


def test_worked_example_linear_family() -> None:
    linear = torch.tensor([[1.0, -0.4, 0.2], [0.125, -0.15, -0.75]])
    assert torch.allclose(run("linear", [D1, D2], W), linear, atol=1e-6)
    assert torch.allclose(run("linear", [D1, D2], W, normalize=True), linear / 1.5, atol=1e-6)
    assert torch.allclose(run("task_arithmetic", [D1, D2], W, **{"lambda": 2.0}), 2 * linear,
                          atol=1e-6)
    assert torch.allclose(run("cat", [D1, D2], W), linear, atol=1e-6)
    pruned = torch.tensor([[1.0, -0.4, 0.0], [0.0, -0.35, -0.9]])
    assert torch.allclose(run("magnitude_prune", [D1, D2], W, density=0.5), pruned, atol=1e-6)


def test_worked_example_dare_with_given_masks() -> None:
    m1 = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    m2 = torch.tensor([[0.0, 1, 1], [1, 1, 0]])

    def parts() -> list[torch.Tensor]:  # DARE with these masks: keep, rescale by 1/0.5
        return [D1 * m1 / 0.5, D2 * m2 / 0.5]

    linear = sparsify.weighted_sum(parts(), W)
    assert torch.allclose(linear, torch.tensor([[1.6, 0.6, 0.4], [0.05, -0.3, -1.8]]), atol=1e-6)
    ties = sparsify.elect_and_merge(parts(), W, "sum")
    assert torch.allclose(ties, torch.tensor([[1.6, 0.6, 0.6], [0.05, -0.7, -1.8]]), atol=1e-6)


# ---- PEFT merge_utils with the same deltas ----

@pytest.mark.parametrize("election", ["sum", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
def test_ties_equals_peft(election: str, density: float) -> None:
    deltas = random_deltas(3, (24, 40), seed=1)
    weights = [0.7, 1.3, -0.4]
    ours = run("ties", deltas, weights, density=density, sign_election=election)
    peft_method = "total" if election == "sum" else "frequency"
    ref = merge_utils.ties(deltas, torch.tensor(weights), density, peft_method)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6)


def test_ties_equals_peft_on_a_large_tensor() -> None:
    """Over 2^20 entries: the sampled-bracket threshold path, still exact."""
    deltas = random_deltas(2, (1100, 1000), seed=2)
    ours = run("ties", deltas, [1.0, 0.5], density=0.3)
    ref = merge_utils.ties(deltas, torch.tensor([1.0, 0.5]), 0.3, "total")
    assert torch.equal(ours != 0, ref != 0)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_magnitude_prune_equals_peft(density: float) -> None:
    deltas = random_deltas(2, (30, 17), seed=3)
    ours = run("magnitude_prune", deltas, [0.6, 0.4], density=density)
    ref = merge_utils.magnitude_prune(deltas, torch.tensor([0.6, 0.4]), density)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_linear_and_task_arithmetic_equal_peft() -> None:
    deltas = random_deltas(3, (9, 11), seed=4)
    weights = [0.5, -1.0, 2.0]
    ref = merge_utils.task_arithmetic(deltas, torch.tensor(weights))
    assert torch.allclose(run("linear", deltas, weights), ref, atol=1e-5)
    assert torch.allclose(run("task_arithmetic", deltas, weights, **{"lambda": 0.5}), 0.5 * ref,
                          atol=1e-5)


def _inject_masks(monkeypatch, masks):  # type: ignore[no-untyped-def]
    """Make PEFT's random_pruning draw our masks, in input order."""
    queue = list(masks)

    def fake_bernoulli(probabilities, *args, **kwargs):  # type: ignore[no-untyped-def]
        mask = queue.pop(0)
        assert mask.shape == probabilities.shape
        return mask.clone()

    monkeypatch.setattr(merge_utils.torch, "bernoulli", fake_bernoulli)
    return queue


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_with_the_same_masks(monkeypatch, method: str, density: float) -> None:
    deltas = random_deltas(2, (150, 40), seed=5)  # 150 rows: three row blocks
    weights = [0.8, 0.6]
    ctx = ModuleContext(name="layer.q", shape=(150, 40), seed=11)
    ours = run(method, deltas, weights, name="layer.q", seed=11, density=density)
    masks = [sparsify.dare_mask(ctx, i, density) for i in range(2)]
    queue = _inject_masks(monkeypatch, masks)
    ref_fn = getattr(merge_utils, method)
    ref = ref_fn(deltas, torch.tensor(weights), density)
    assert not queue  # both masks consumed
    assert torch.allclose(ours, ref, atol=1e-6)
    kept = sum(float(m.mean()) for m in masks) / 2
    assert abs(kept - density) < 0.05


def test_dare_density_one_is_plain_weighted_sum() -> None:
    deltas = random_deltas(2, (10, 12), seed=6)
    ref = merge_utils.dare_linear(deltas, torch.tensor([1.0, 2.0]), 1.0)
    assert torch.allclose(run("dare_linear", deltas, [1.0, 2.0], density=1.0), ref, atol=1e-6)


# ---- mergekit semantics (independent re-statement of mergekit's formulas) ----

def mergekit_ties(deltas, weights, density, consensus="sum"):  # type: ignore[no-untyped-def]
    def magnitude(t):  # mergekit.sparsify.magnitude
        if density >= 1:
            return t
        k = max(1, int(density * t.numel()))
        mask = torch.zeros(t.numel())
        mask[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
        return t * mask.reshape(t.shape)

    stacked = torch.stack([magnitude(d) for d in deltas])
    w = torch.tensor(weights).reshape(-1, 1, 1)
    weighted = stacked * w
    sign = weighted.sign()
    total = weighted.sum(0) if consensus == "sum" else sign.sum(0)
    majority = (total >= 0).float() * 2 - 1
    mask = sign == majority
    mixed = (weighted * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return mixed / divisor


@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_ties_mergekit_mode_equals_mergekit_formula(density: float) -> None:
    deltas = random_deltas(3, (20, 33), seed=7)
    weights = [0.2, 0.5, 1.5]
    ours = run("ties", deltas, weights, density=density, sign_election="mergekit")
    assert torch.allclose(ours, mergekit_ties(deltas, weights, density), atol=1e-6)


def test_ties_mergekit_mode_equals_installed_mergekit_if_present() -> None:
    # mergekit is in the test extra, so CI runs this comparison; a bare install skips it.
    mk_sparsify = pytest.importorskip("mergekit.sparsify")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    deltas = random_deltas(2, (16, 16), seed=8)
    weights = [0.3, 0.9]
    stacked = torch.stack([mk_sparsify.magnitude(d, 0.5) for d in deltas])
    w = torch.tensor(weights).reshape(-1, 1, 1)
    mask = gta.get_mask(stacked * w, method="sum")
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    ref = (stacked * w * mask).sum(0) / divisor
    assert torch.allclose(run("ties", deltas, weights, density=0.5, sign_election="mergekit"), ref,
                          atol=1e-6)


# ---- thresholds, parameters ----

@pytest.mark.parametrize("shape,density", [((40, 30), 0.37), ((1200, 900), 0.5),
                                           ((1030, 1100), 0.02), ((1030, 1100), 0.97)])
def test_threshold_keeps_exactly_k(shape, density) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(9)
    inp = ModuleInput(0, torch.randn(shape[0], 6, generator=gen), torch.randn(6, shape[1], generator=gen),
                      1.0)
    ctx = ModuleContext("x", shape, 0)
    t = sparsify.magnitude_threshold(inp, density, ctx)
    full = inp.B @ inp.A
    kept = torch.cat([sparsify.trim_block(sparsify.block_delta(inp, b), t)
                      for b in sparsify.row_blocks(shape[0])])
    assert int(torch.count_nonzero(kept)) == int(density * full.numel())


def test_threshold_edges() -> None:
    inp = ModuleInput(0, torch.eye(2), torch.tensor([[1.0, -2.0], [3.0, 0.5]]), 1.0)
    ctx = ModuleContext("x", (2, 2), 0)
    assert sparsify.magnitude_threshold(inp, 1.0, ctx) == 0.0
    assert math.isinf(sparsify.magnitude_threshold(inp, 0.1, ctx))  # int(0.4) == 0 entries
    assert sparsify.magnitude_threshold(inp, 0.5, ctx) == 2.0


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), True])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_bad_density_refused(method: str, density: float) -> None:
    with pytest.raises(BadInputError, match="density must be in"):
        get_method(method).resolve({"density": density}, [1.0, 1.0])


def test_parameters_checked() -> None:
    with pytest.raises(BadInputError, match="does not apply to method linear"):
        get_method("linear").resolve({"density": 0.5}, [1.0])
    with pytest.raises(BadInputError, match="unknown sign election"):
        get_method("ties").resolve({"sign_election": "vote"}, [1.0])
    with pytest.raises(BadInputError, match="lambda"):
        get_method("ties").resolve({"lambda": float("inf")}, [1.0])
    with pytest.raises(BadInputError, match="sum of the weights"):
        get_method("linear").resolve({"normalize": True}, [1.0, -1.0])
    get_method("ties").resolve({"normalize": False, "density": None}, [1.0])  # "not chosen"
    params = get_method("ties").resolve({}, [1.0, 2.0])
    assert params == MergeParams(density=0.5, lam=1.0, normalize=False, sign_election="sum",
                                 weight_sum=3.0)
    assert get_method("ties").recorded(params) == {"density": 0.5, "lambda": 1.0,
                                                   "sign_election": "sum"}


def test_generators_are_stable_and_distinct() -> None:
    a = ModuleContext("m.q", (2, 2), 5).generator("dare", 0, 0)
    b = ModuleContext("m.q", (2, 2), 5).generator("dare", 0, 0)
    c = ModuleContext("m.q", (2, 2), 6).generator("dare", 0, 0)
    d = ModuleContext("m.k", (2, 2), 5).generator("dare", 0, 0)
    draws = [torch.rand(4, generator=g) for g in (a, b, c, d)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])


# ---- the engine on hand-made adapter directories ----

SHAPES = {"model.layers.0.self_attn.q_proj": (40, 24), "model.layers.0.mlp.up_proj": (56, 24),
          "model.layers.1.self_attn.q_proj": (40, 24)}


@pytest.fixture()
def pair(tmp_path):  # type: ignore[no-untyped-def]
    from tests.support.merge import random_adapter

    a = random_adapter(tmp_path / "a", SHAPES, 4, seed=1)
    b = random_adapter(tmp_path / "b", SHAPES, 6, seed=2, alpha=12)
    return tmp_path, a, b


def test_dare_is_bit_identical_regardless_of_module_order_and_threads(pair) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters
    from tests.support.merge import random_adapter

    root, a, b = pair
    name = "model.layers.1.self_attn.q_proj"
    key = f"base_model.model.{name}.lora_A.weight"
    full = merge_adapters([a, b], [0.5, 0.5], "dare_ties", params={"density": 0.4}, seed=3)
    # the same module merged alone (a different sequence of modules and RNG use)
    only_a = random_adapter(root / "a1", {name: SHAPES[name]}, 4, seed=1)
    only_b = random_adapter(root / "b1", {name: SHAPES[name]}, 6, seed=2, alpha=12)
    assert torch.equal(load_delta(only_a, name), load_delta(a, name))
    torch.manual_seed(999)  # the global RNG must not matter
    alone = merge_adapters([only_a, only_b], [0.5, 0.5], "dare_ties", params={"density": 0.4},
                           seed=3)
    assert torch.equal(alone.tensors[key], full.tensors[key])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = merge_adapters([a, b], [0.5, 0.5], "dare_ties", params={"density": 0.4}, seed=3)
    finally:
        torch.set_num_threads(threads)
    for k, v in full.tensors.items():
        assert torch.equal(single.tensors[k], v), k
    other = merge_adapters([a, b], [0.5, 0.5], "dare_ties", params={"density": 0.4}, seed=4)
    assert not torch.equal(other.tensors[key], full.tensors[key])


def load_delta(path, name):  # type: ignore[no-untyped-def]
    from merging.adapter import load_adapter

    return load_adapter(path).module(f"base_model.model.{name}").delta()


def test_missing_module_contributes_zero(pair) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters
    from tests.support.merge import random_adapter

    root, a, _ = pair
    name = "model.layers.0.mlp.up_proj"
    c = random_adapter(root / "c", {"model.layers.0.self_attn.q_proj": (40, 24)}, 2, seed=3)
    res = merge_adapters([a, c], [1.0, 3.0], "linear", params={"normalize": True})
    key = f"base_model.model.{name}"
    got = res.tensors[key + ".lora_B.weight"] @ res.tensors[key + ".lora_A.weight"]
    assert torch.allclose(got, load_delta(a, name) / 4.0, atol=1e-6)
    assert res.report["modules"][key]["inputs"] == [0]
    ties = merge_adapters([a, c], [1.0, 3.0], "ties", params={"density": 1.0}, rank="full")
    got = ties.tensors[key + ".lora_B.weight"] @ ties.tensors[key + ".lora_A.weight"]
    assert torch.allclose(got, load_delta(a, name), atol=1e-6)  # alone: its own value, weight 1


def test_output_config_and_ranks(pair) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters

    _, a, b = pair
    res = merge_adapters([a, b], None, "cat")
    assert res.config["r"] == 10 and res.config["lora_alpha"] == 10 and res.config["rank_pattern"] == {}
    assert res.report["error"] < 1e-6
    res = merge_adapters([a, b], None, "ties", params={"density": 0.5}, rank=3)
    assert {m["rank"] for m in res.report["modules"].values()} == {3}
    res = merge_adapters([a, a], [0.5, 0.5], "linear")  # an adapter with itself keeps rank 4
    assert res.config["r"] == 4 and res.report["error"] < 1e-6
    with pytest.raises(BadInputError, match="rank"):
        merge_adapters([a, b], None, "ties", rank=0)
    with pytest.raises(BadInputError, match="density"):
        merge_adapters([a, b], None, "ties", params={"density": 0})
    with pytest.raises(BadInputError, match="weights"):
        merge_adapters([a, b], [1.0], "ties")


def test_regex_targets_give_an_exact_regex(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re

    from merging.lora.engine import merge_adapters
    from tests.support.merge import random_adapter

    a = random_adapter(tmp_path / "a", SHAPES, 2, seed=1)
    b = random_adapter(tmp_path / "b", {"model.layers.1.self_attn.q_proj": (40, 24)}, 2, seed=2,
                       target_modules=r".*layers\.1\.self_attn\.q_proj")
    res = merge_adapters([a, b], None, "linear")
    pattern = res.config["target_modules"]
    assert isinstance(pattern, str)
    assert all(re.fullmatch(pattern, n) for n in SHAPES)
    assert not re.fullmatch(pattern, "model.layers.1.self_attn.k_proj")


def test_dtypes_are_kept_or_promoted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters
    from tests.support.merge import random_adapter

    a = random_adapter(tmp_path / "a", SHAPES, 2, seed=1, dtype=torch.bfloat16)
    b = random_adapter(tmp_path / "b", SHAPES, 2, seed=2, dtype=torch.bfloat16)
    c = random_adapter(tmp_path / "c", SHAPES, 2, seed=3, dtype=torch.float16)
    res = merge_adapters([a, b], None, "ties")
    assert {t.dtype for t in res.tensors.values()} == {torch.bfloat16}
    assert 0 < res.report["error"] < 1  # measured on the stored bf16 factors
    assert merge_adapters([a, c], None, "linear").report["dtype"] == "float32"


def test_unsupported_configs_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from merging.adapter import load_adapter
    from registry.errors import UnsupportedAdapterError
    from tests.support.merge import random_adapter

    for field, value in [("use_dora", True), ("lora_bias", True), ("init_lora_weights", "pissa"),
                         ("trainable_token_indices", [1, 2])]:
        path = random_adapter(tmp_path / field, SHAPES, 2, seed=1, **{field: value})
        with pytest.raises(UnsupportedAdapterError):
            load_adapter(path)


def test_write_peft_dir_is_atomic_and_refuses_non_empty(pair) -> None:  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters
    from merging.lora.peft_output import write_peft_dir
    from registry.errors import ConflictError

    root, a, b = pair
    res = merge_adapters([a, b], None, "linear")
    (root / "empty").mkdir()
    out = write_peft_dir(res, root / "empty")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ConflictError):
        write_peft_dir(res, out)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_write_peft_dir_modes_ignore_the_umask(pair) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat

    from merging.lora.engine import merge_adapters
    from merging.lora.peft_output import write_peft_dir

    root, a, b = pair
    res = merge_adapters([a, b], None, "linear")
    old = os.umask(0)  # the worst case: plain open/mkdir would give 0666 files, 0777 dirs
    try:
        out = write_peft_dir(res, root / "new" / "parents" / "merged")
    finally:
        os.umask(old)
    modes = {p.relative_to(root): stat.S_IMODE(p.stat().st_mode)
             for p in [root / "new", root / "new" / "parents", out, *out.iterdir()]}
    assert modes == {p: 0o755 if (root / p).is_dir() else 0o644 for p in modes}, \
        {str(p): oct(m) for p, m in modes.items()}


def test_check_bases() -> None:
    from merging.lora.inputs import check_bases
    from registry.errors import BaseMismatchError

    def base(struct, weights):  # type: ignore[no-untyped-def]
        return {"id": "m", "revision": None,
                "fingerprint": {"struct_digest": "sha256:" + struct * 64,
                                "weights_digest": "sha256:" + weights * 64}}

    assert check_bases([base("a", "1"), base("a", "1")], ["x", "y"]) == []
    with pytest.raises(BaseMismatchError, match="different structure"):
        check_bases([base("a", "1"), base("b", "1")], ["x", "y"], allow_weights_mismatch=True)
    with pytest.raises(BaseMismatchError, match="not its weights") as info:
        check_bases([base("a", "1"), base("a", "2")], ["x", "y"])
    assert "--allow-base-mismatch" in (info.value.fix or "")
    warnings = check_bases([base("a", "1"), base("a", "2")], ["x", "y"], allow_weights_mismatch=True)
    assert len(warnings) == 1 and "merged anyway" in warnings[0]
    assert "could not be verified" in check_bases([base("a", "1"), None], ["x", "y"])[0]


OVERFLOW_SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64)}


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "della_linear", "linear"])
def test_finite_factors_whose_delta_overflows_float32_are_refused(tmp_path, method) -> None:
    # found by a QA pass: fp16 factors of 60000 with lora_alpha 1e30 are finite, but s·B·A is
    # 3.6e39; ties silently dropped that input (trim threshold inf), dare_linear crashed in SVD
    from merging.lora.engine import merge_adapters
    from tests.support.merge import lora_config, random_adapter, write_adapter

    good = random_adapter(tmp_path / "a", OVERFLOW_SHAPES, 4, seed=1)
    huge = write_adapter(tmp_path / "huge", {k: (torch.full((1, s[1]), 6e4).half(),
                                                 torch.full((s[0], 1), 6e4).half())
                                             for k, s in OVERFLOW_SHAPES.items()},
                         lora_config(1, 1e30, ["q_proj"]))
    with pytest.raises(BadInputError, match=r"input 2: module .*q_proj: its delta s·B·A overflows "
                                            r"float32 \(entries up to 3.6e\+39"):
        merge_adapters([good, huge], [1.0, 1.0], method)


@pytest.mark.parametrize("group_modules", [False, True])
def test_weights_that_overflow_the_merged_delta_are_refused(tmp_path, group_modules) -> None:
    from merging.lora.engine import merge_adapters
    from tests.support.merge import random_adapter

    a = random_adapter(tmp_path / "a", OVERFLOW_SHAPES, 4, seed=1)
    b = random_adapter(tmp_path / "b", OVERFLOW_SHAPES, 4, seed=2)
    with pytest.raises(BadInputError, match="merged delta of .*q_proj overflows float32"):
        merge_adapters([a, b], [3e38, 3e38], "ties", params={"density": 1.0},
                       group_modules=group_modules)


@pytest.mark.parametrize(("method", "weights", "params"), [
    ("linear", [1e39, 1.0], {}), ("task_arithmetic", [1.0, 1.0], {"lambda": 1e39}),
    ("cat", [3e38, 3e38], {}), ("ties", [1e39, 1e39], {}), ("della", [1.0, 1.0], {"lambda": 1e39}),
])
def test_exact_methods_whose_factors_overflow_are_refused(tmp_path, method, weights, params) -> None:
    # found by a QA pass: the exact (stacked-factor) methods skipped the overflow check and
    # crashed in the SVD (exit 70); they are refused like the dense ones
    from merging.lora.engine import merge_adapters
    from registry.errors import MergeRangeError
    from tests.support.merge import random_adapter

    a = random_adapter(tmp_path / "a", OVERFLOW_SHAPES, 4, seed=1)
    b = random_adapter(tmp_path / "b", OVERFLOW_SHAPES, 4, seed=2)
    with pytest.raises(MergeRangeError, match="overflows float32|do not fit float32|does not fit float32"):
        merge_adapters([a, b], weights, method, params=params)


def test_a_merge_that_does_not_fit_float16_is_refused(tmp_path) -> None:
    from merging.lora.engine import merge_adapters
    from tests.support.merge import lora_config, write_adapter

    big = {k: (torch.full((1, s[1]), 3e4).half(), torch.full((s[0], 1), 3e4).half())
           for k, s in OVERFLOW_SHAPES.items()}  # one singular value of 64 * 9e8 * 16: sqrt > 65504
    a = write_adapter(tmp_path / "a", big, lora_config(1, 16.0, ["q_proj"]))
    with pytest.raises(BadInputError, match="merged factors do not fit float16"):
        merge_adapters([a, a], [1.0, 1.0], "linear")


def test_a_merge_with_zero_modules_says_so(tmp_path) -> None:
    # found by a QA pass: --density 1e-30 keeps nothing and pushed an all-zero adapter silently
    from merging.lora.engine import merge_adapters
    from tests.support.merge import PAIR_SHAPES, random_adapter

    a = random_adapter(tmp_path / "a", PAIR_SHAPES, 4, seed=1)
    b = random_adapter(tmp_path / "b", PAIR_SHAPES, 4, seed=2)
    empty = merge_adapters([a, b], [1.0, 1.0], "ties", params={"density": 1e-30})
    assert all(m["norm"] == 0.0 for m in empty.report["modules"].values())
    assert empty.report["warnings"] == [
        "3 of 3 merged modules are zero (nothing survived the merge there; is the density too small?)"]
    assert merge_adapters([a, b], [1.0, 1.0], "ties", params={"density": 0.5}).report["warnings"] == []
