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


def test_only_sdpa_models_without_alibi_take_the_static_path(model_and_ids, monkeypatch) -> None:
    """Found by a review: a boolean 4D mask means "attend" to SDPA only (eager attention
    adds it to the scores, so nothing was masked and the tokens were wrong), and ALiBi
    models build their biases from a 2D mask (Bloom raised)."""
    model, encoded = model_and_ids
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert not graphs_wanted(model, "cuda")
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")
    monkeypatch.setattr(model.config, "alibi", True, raising=False)
    assert not graphs_wanted(model, "cuda")
    monkeypatch.setattr(model.config, "alibi", False)
    monkeypatch.setattr(model.config, "model_type", "bloom")
    assert not graphs_wanted(model, "cuda")


def test_a_model_the_static_path_fails_on_is_decoded_eagerly_from_then_on(model_and_ids, monkeypatch) -> None:
    import gate.decoding as decoding

    model, encoded = model_and_ids
    expected = greedy(model, encoded, [4] * len(encoded), eos=set(), pad_id=0)
    monkeypatch.setattr(decoding, "graphs_wanted", lambda m, d: FAILED not in m.__dict__)

    def broken(*_args, **_kwargs):  # what Bloom's 2D-mask code raised
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(decoding, "static_greedy", broken)
    try:
        assert greedy(model, encoded, [4] * len(encoded), eos=set(), pad_id=0) == expected
        assert "ValueError" in model.__dict__[FAILED]
    finally:
        model.__dict__.pop(FAILED, None)


def test_kept_shapes_are_bounded_by_count_and_bytes(monkeypatch) -> None:
    from collections import OrderedDict
    from types import SimpleNamespace

    import gate.graph_decoding as graph_decoding

    def state(nbytes: int):  # a kept shape whose cache holds nbytes
        layer = SimpleNamespace(keys=torch.empty(nbytes // 2, dtype=torch.uint8),
                                values=torch.empty(nbytes // 2, dtype=torch.uint8))
        return graph_decoding._Step(cache=SimpleNamespace(layers=[layer]), token=torch.empty(0),
                                    positions=torch.empty(0), mask=torch.empty(0))

    monkeypatch.setattr(graph_decoding, "KEPT_BYTES", 1000)
    kept = OrderedDict(((i, 0, 0), state(300)) for i in range(3))
    graph_decoding._trim(kept)
    assert list(kept) == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    kept[(3, 0, 0)] = state(300)
    graph_decoding._trim(kept)  # 1200 bytes: the least recently used goes
    assert list(kept) == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    kept[(4, 0, 0)] = state(5000)
    graph_decoding._trim(kept)  # alone over the bound: nothing is kept
    assert not kept
    monkeypatch.setattr(graph_decoding, "KEPT_BYTES", 1 << 40)
    kept.update(((i, 0, 0), state(2)) for i in range(GRAPHS_KEPT + 3))
    graph_decoding._trim(kept)
    assert len(kept) == GRAPHS_KEPT and next(iter(kept)) == (3, 0, 0)
