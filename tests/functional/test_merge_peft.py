"""Merged adapters load in PEFT and do what the math says, on a tiny Llama.

Inputs are real PEFT adapters (different ranks and targets, ``rank_pattern``,
``alpha_pattern``, rslora, a ``modules_to_save`` copy). For every method the merged
adapter is loaded with ``PeftModel.from_pretrained`` and its logits are compared
with the base model whose weights are ``W + merged delta``, the merged delta being
computed independently: the inputs' deltas read with peft's own pattern lookup
(``tests.support.merge.delta_of``) and combined with ``peft.utils.merge_utils``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from merging.adapter import load_adapter
from merging.lora.engine import merge_adapters
from merging.lora.peft_output import write_peft_dir
from merging.lora.sparsify import dare_mask
from merging.lora.methods import ModuleContext
from registry.errors import UnsupportedAdapterError
from tests.support.merge import (
    MERGE_LLAMA,
    PREFIX,
    delta_of,
    peft_adapter,
    write_adapter,
    lora_config,
)
from tests.support.tiny_llama import save_tiny_llama

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

WEIGHTS = [0.6, 0.9]
TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 64]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("merge-peft")
    base = save_tiny_llama(root / "base", MERGE_LLAMA)
    a = peft_adapter(base, root / "a", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                     seed=1, rank_pattern={"layers.0.self_attn.q_proj": 2},
                     alpha_pattern={"v_proj": 16}, modules_to_save=["lm_head"])
    b = peft_adapter(base, root / "b", r=8, alpha=8, targets=["q_proj", "k_proj", "up_proj"],
                     seed=2, use_rslora=True)
    return root, base, a, b


def logits_with_deltas(base: Path, deltas: dict[str, torch.Tensor],
                       replace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, delta in deltas.items():
            state[name + ".weight"].add_(delta)
        for key, value in (replace or {}).items():
            state[key].copy_(value)
        return model(TOKENS).logits


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def expected_deltas(method: str, a: Path, b: Path, density: float, seed: int) -> dict[str, torch.Tensor]:
    da, db = delta_of(a), delta_of(b)
    out = {}
    for name in sorted(set(da) | set(db)):
        present = [(i, d[name]) for i, d in enumerate((da, db)) if name in d]
        deltas = [d for _, d in present]
        weights = torch.tensor([WEIGHTS[i] for i, _ in present])
        if method == "linear":
            out[name] = merge_utils.task_arithmetic(deltas, weights)
        elif method == "ties":
            out[name] = merge_utils.ties(deltas, weights, density, "total")
        elif method == "magnitude_prune":
            out[name] = merge_utils.magnitude_prune(deltas, weights, density)
        elif method in ("dare_linear", "dare_ties"):
            ctx = ModuleContext(PREFIX + name, tuple(deltas[0].shape), seed)
            masks = [dare_mask(ctx, i, density) for i, _ in present]
            original = merge_utils.torch.bernoulli
            merge_utils.torch.bernoulli = lambda p, *args, masks=masks, **kw: masks.pop(0)
            try:
                out[name] = getattr(merge_utils, method)(deltas, weights, density)
            finally:
                merge_utils.torch.bernoulli = original
    return out


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_merged_adapter_logits_equal_base_plus_independent_delta(setup, method: str) -> None:
    root, base, a, b = setup
    params = {} if method == "linear" else {"density": 0.6}
    rank = None if method == "linear" else "full"
    result = merge_adapters([a, b], WEIGHTS, method, params=params, rank=rank, seed=7)
    out = write_peft_dir(result, root / f"out-{method}")
    expected = expected_deltas(method, a, b, 0.6, 7)
    lm_head = load_adapter(a).extra_tensor(PREFIX + "lm_head.weight")
    want = logits_with_deltas(base, expected, {"lm_head.weight": lm_head})
    got = peft_logits(base, out)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)
    assert result.report["error"] < 1e-6  # exact (linear) or full rank
    # the stored deltas themselves, module by module
    stored = delta_of(out)
    assert set(stored) == set(expected)
    for name, delta in expected.items():
        assert torch.allclose(stored[name], delta, atol=1e-6), name


def test_default_rank_ties_is_the_truncated_svd_of_the_true_merge(setup) -> None:
    root, base, a, b = setup
    result = merge_adapters([a, b], WEIGHTS, "ties", params={"density": 0.6})
    out = write_peft_dir(result, root / "out-ties-default")
    expected = expected_deltas("ties", a, b, 0.6, 0)
    stored = delta_of(out)
    for name, delta in expected.items():
        rank = max(delta_of_rank for delta_of_rank in
                   [load_adapter(p).infos[PREFIX + name].rank for p in (a, b)
                    if PREFIX + name in load_adapter(p).infos])
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose(stored[name], best, atol=1e-5), name
        err = float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta))
        assert result.report["modules"][PREFIX + name]["error"] == pytest.approx(err, abs=1e-5)
        assert result.report["modules"][PREFIX + name]["rank"] == rank
    cfg = result.config
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["modules_to_save"] == ["lm_head"]
    assert any("lm_head" in w for w in result.report["warnings"])
    torch.testing.assert_close(peft_logits(base, out), logits_with_deltas(
        base, stored, {"lm_head.weight": load_adapter(a).extra_tensor(PREFIX + "lm_head.weight")}),
        atol=2e-5, rtol=1e-4)


def test_linear_has_no_cross_terms_unlike_peft_linear(setup) -> None:
    """Two orthogonal rank-1 adapters: our linear merge is the exact sum."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base, _, _ = setup
    name = "model.layers.0.self_attn.q_proj"
    e = torch.eye(32)
    one = write_adapter(root / "rank1-a", {name: (e[0:1], e[:, 0:1])}, lora_config(1, 1, ["q_proj"]))
    two = write_adapter(root / "rank1-b", {name: (e[1:2], e[:, 1:2])}, lora_config(1, 1, ["q_proj"]))
    exact = delta_of(one)[name] + delta_of(two)[name]  # E00 + E11
    ours = write_peft_dir(merge_adapters([one, two], [1.0, 1.0], "linear"), root / "rank1-ours")
    assert torch.equal(delta_of(ours)[name], exact)
    assert load_adapter(ours).infos[PREFIX + name].rank == 2
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(one),
                                      adapter_name="a")
    model.load_adapter(str(two), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    peft_delta = layer.get_delta_weight("lin")
    cross = torch.zeros(32, 32)
    cross[0, 1] = cross[1, 0] = 1.0
    assert torch.allclose(peft_delta, exact + cross)  # PEFT adds E01 + E10


@pytest.mark.parametrize("kwargs,match", [({"use_dora": True}, "DoRA"),
                                          ({"lora_bias": True}, "lora_bias")])
def test_dora_and_lora_bias_refused(setup, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    root, base, a, _ = setup
    bad = peft_adapter(base, root / f"bad-{match}", r=2, alpha=2, targets=["q_proj"], seed=3,
                       **kwargs)
    with pytest.raises(UnsupportedAdapterError, match=match):
        load_adapter(bad)
    with pytest.raises(UnsupportedAdapterError):
        merge_adapters([a, bad], None, "linear")


def test_clashing_modules_to_save_refused(setup) -> None:
    root, base, a, _ = setup
    other = peft_adapter(base, root / "mts-other", r=2, alpha=2, targets=["q_proj"], seed=5,
                         modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedAdapterError, match="lm_head"):
        merge_adapters([a, other], None, "ties")
    same = copy.deepcopy(a)  # the identical copy is not a clash
    assert merge_adapters([a, same], None, "linear").report["warnings"] == []


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_embedding_lora_merges(setup, method: str) -> None:
    root, base, _, _ = setup
    one = peft_adapter(base, root / f"emb-1-{method}", r=4, alpha=8,
                       targets=["embed_tokens", "q_proj"], seed=11)
    two = peft_adapter(base, root / f"emb-2-{method}", r=2, alpha=4,
                       targets=["embed_tokens", "v_proj"], seed=12)
    params = {} if method == "linear" else {"density": 0.5}
    result = merge_adapters([one, two], WEIGHTS, method, params=params,
                            rank=None if method == "linear" else "full")
    out = write_peft_dir(result, root / f"emb-out-{method}")
    da, db = delta_of(one), delta_of(two)
    expected = {}
    for name in sorted(set(da) | set(db)):
        present = [(w, d[name]) for w, d in zip(WEIGHTS, (da, db), strict=True) if name in d]
        weights = torch.tensor([w for w, _ in present])
        deltas = [d for _, d in present]
        expected[name] = (merge_utils.task_arithmetic(deltas, weights) if method == "linear"
                          else merge_utils.ties(deltas, weights, 0.5, "total"))
    assert "model.embed_tokens" in expected
    torch.testing.assert_close(peft_logits(base, out), logits_with_deltas(base, expected),
                               atol=2e-5, rtol=1e-4)
