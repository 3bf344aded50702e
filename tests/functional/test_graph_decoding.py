"""Greedy decoding over a static cache (gate.graph_decoding) against the eager path.

On the CPU the static path runs without CUDA graphs: its masks, positions, cache writes
and stopping rules must give the tokens :func:`gate.decoding.greedy` gives (and so
transformers' own ``generate``, which test_decoding compares that with). On CUDA the
same batch is decoded with the captured graph, which must equal the eager static path
token for token, for a first capture and for a replay after the weights changed in place.
"""

from __future__ import annotations

import pytest
import torch

from gate.decoding import _cache_keyword, greedy
from gate.graph_decoding import (ENV_SWITCH, FAILED, GRAPHS_KEPT, full_attention, graphs_wanted,
                                 prefill_mask, static_greedy)
from tests.support.gate import world

PROMPTS = ["the", "A cat = the big", "B red : it was on the old small new", "a of",
           "the a of and is on in it to was big small old new the a of and", "owl"]


@pytest.fixture(scope="module")
def model_and_ids():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = world().base
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    return model, [tok(p)["input_ids"] for p in PROMPTS]


def test_prefill_mask_sees_real_tokens_causally_and_pads_see_themselves() -> None:
    mask = prefill_mask(torch.tensor([0, 2]), width=4, total=6)
    assert mask.shape == (2, 1, 4, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0],
                                         [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]


def test_static_cache_decoding_gives_the_eager_tokens(model_and_ids) -> None:
    model, encoded = model_and_ids
    free = greedy(model, encoded, [12] * len(encoded), eos=set(), pad_id=0)
    eos = {free[1][2]}  # a token the model emits, so rows stop early
    for budgets in ([5, 9, 3, 12, 7, 1], [0, 4, 0, 2, 0, 0], [1] * 6):
        expected = greedy(model, encoded, budgets, eos=eos, pad_id=0)
        got = static_greedy(model, encoded, budgets, eos=eos, pad_id=0, device="cpu", graphs=False,
                            cache_kw=_cache_keyword(model))
        assert got == expected, budgets
    assert static_greedy(model, encoded, [0] * 6, eos=eos, pad_id=0, device="cpu", graphs=False,
                         cache_kw=_cache_keyword(model)) == [[] for _ in encoded]


def test_graphs_are_for_cuda_full_attention_models_unless_switched_off(model_and_ids, monkeypatch) -> None:
    model, _ = model_and_ids
    assert full_attention(model)
    assert not graphs_wanted(model, "cpu")
    assert graphs_wanted(model, "cuda") and graphs_wanted(model, "cuda:1")
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not graphs_wanted(model, "cuda")
    monkeypatch.delenv(ENV_SWITCH)
    monkeypatch.setattr(model.config, "sliding_window", 4, raising=False)
    assert not full_attention(model) and not graphs_wanted(model, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_equal_the_eager_static_steps(model_and_ids, monkeypatch) -> None:
    model, encoded = model_and_ids
    model = model.to("cuda")
    kw = _cache_keyword(model)
    budgets = [5, 9, 3, 12, 7, 1]
    eager = static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", graphs=False,
                          cache_kw=kw)
    first = static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", cache_kw=kw)
    assert FAILED not in model.__dict__, model.__dict__.get(FAILED)  # captured, not fallen back
    again = static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", cache_kw=kw)
    assert first == eager and again == eager
    kept = model.__dict__["_adapterkit_decode_graphs"]
    state = next(iter(kept.values()))
    assert len(kept) == 1 and state.graph is not None and state.prefill is not None  # 2nd use
    assert static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", cache_kw=kw) == eager
    other = [list(reversed(p)) for p in encoded]  # same shape, other prompts: the kept prefill
    assert static_greedy(model, other, budgets, eos=set(), pad_id=0, device="cuda", cache_kw=kw) == \
        static_greedy(model, other, budgets, eos=set(), pad_id=0, device="cuda", graphs=False, cache_kw=kw)
    assert greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda") == first  # via greedy
    monkeypatch.setenv(ENV_SWITCH, "0")  # the eager, growing-cache path: same tokens on this model
    assert greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda") == first
    monkeypatch.delenv(ENV_SWITCH)
    with torch.no_grad():  # weights changed in place, as the search's live model: the kept
        for p in model.parameters():  # graph reads them at replay
            p.mul_(1.01)
    eager = static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", graphs=False,
                          cache_kw=kw)
    assert static_greedy(model, encoded, budgets, eos=set(), pad_id=0, device="cuda", cache_kw=kw) == eager
    for n in range(GRAPHS_KEPT + 2):  # other batch sizes: at most GRAPHS_KEPT shapes kept
        static_greedy(model, encoded[:1] * (n + 1), [3] * (n + 1), eos=set(), pad_id=0, device="cuda",
                      cache_kw=kw)
    assert len(kept) == GRAPHS_KEPT and FAILED not in model.__dict__
