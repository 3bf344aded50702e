"""Batched greedy decoding (gate.decoding) against transformers' own greedy search.

The reference is ``model.generate(do_sample=False)`` on one unpadded prompt at a
time; the batch mixes prompt lengths (so rows are left-padded) and token budgets.
"""

from __future__ import annotations

import pytest
import torch

from gate.decoding import Generation, finish, greedy
from gate.evaluate import Evaluator
from tests.support.gate import world

PROMPTS = ["the", "A cat = the big", "B red : it was on the old small new", "a of",
           "the a of and is on in it to was big small old new the a of and", "owl"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = world().base
    return (AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(base)))


def _reference(model, ids: list[int], budget: int, eos: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=budget,
                              eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def test_batch_equals_one_prompt_at_a_time_generate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    encoded = [tok(p)["input_ids"] for p in PROMPTS]
    budgets = [5, 9, 3, 12, 7, 1]
    # an EOS the model actually emits, so some rows stop early
    free = greedy(model, encoded, [12] * len(encoded), eos=set(), pad_id=0)
    eos = free[1][2]
    rows = greedy(model, encoded, budgets, eos={eos}, pad_id=0)
    expected = [_reference(model, ids, budget, eos) for ids, budget in zip(encoded, budgets, strict=True)]
    assert rows == expected
    assert len(rows[1]) == 2  # stopped before its EOS
    assert all(len(r) <= b for r, b in zip(rows, budgets, strict=True))


def test_evaluator_batches_agree_with_single_prompts(model_and_tokenizer) -> None:
    ev = Evaluator(world().base)
    model, _ = model_and_tokenizer
    prompts = PROMPTS * 3  # 18 prompts: more than one batch of 16
    budgets = [4 + i % 5 for i in range(len(prompts))]
    batched = ev.generate_many(model, prompts, budgets)
    one_by_one = ev.generate_many(model, prompts, budgets, batch_size=1)
    assert batched == one_by_one
    assert batched[0] == ev.generate(model, prompts[0], budgets[0])
    assert all(isinstance(g, Generation) and len(g.token_ids) <= b for g, b in zip(batched, budgets, strict=True))


def test_finish_cuts_at_the_first_stop_string() -> None:
    words = {1: "\n", 2: "meow", 3: ".", 4: "woof"}

    def decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids)

    # a leading newline is not a boundary; the first stop after text ends the row
    got = finish([1, 2, 3, 4, 1, 4], decode, stop=["\n", "."])
    assert got == Generation("meow", (1, 2, 3))
    assert finish([2, 4], decode) == Generation("meowwoof", (2, 4))
    assert finish([], decode, stop=["\n"]) == Generation("", ())


def test_bad_batches_refused(model_and_tokenizer) -> None:
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError):
        greedy(model, [[2, 5]], [1, 2], eos=set(), pad_id=0)
    with pytest.raises(ValueError):
        greedy(model, [[]], [3], eos=set(), pad_id=0)
    assert greedy(model, [], [], eos=set(), pad_id=0) == []


def test_batched_forward_matches_rows_alone(model_and_tokenizer) -> None:
    from gate.decoding import forward_many

    model, tok = model_and_tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    batched = forward_many(model, rows, pad_id=0, batch_size=4)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r])).logits[0].float() for r in rows]
    assert all(b.shape == a.shape for b, a in zip(batched, alone, strict=True))
    assert max(float((b - a).abs().max()) for b, a in zip(batched, alone, strict=True)) <= 1e-5
    with pytest.raises(ValueError):
        forward_many(model, [[]], pad_id=0)


def test_perplexity_and_loglik_match_transformers_losses(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    ev = Evaluator(world().base)
    texts = [p for p in PROMPTS if len(tok(p)["input_ids"]) >= 2]  # one-token texts are skipped
    assert len(texts) >= 4
    # reference: transformers' own mean NLL per text (labels = inputs), token-weighted
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert ev.perplexity(model, texts) == pytest.approx(float(torch.tensor(nll / count).exp()),
                                                        rel=1e-5)
    pairs = [("A cat =", "meow"), ("B red : the", "big old"), ("the", "a of and")]
    scored = ev.answer_logprobs(model, pairs)
    for (prompt, answer), (logp, n) in zip(pairs, scored, strict=True):
        ctx, cont = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
        expected = torch.log_softmax(logits[len(ctx) - 1:-1], -1).gather(
            1, torch.tensor(cont)[:, None]).sum()
        assert n == len(cont) and logp == pytest.approx(float(expected), abs=1e-4)


def test_an_answer_longer_than_the_window_is_scored_on_its_tail(model_and_tokenizer) -> None:
    # found by a QA pass: with max_length 8 a 10-token answer crashed the loglik check
    model, tok = model_and_tokenizer
    ev = Evaluator(world().base, max_length=8)
    prompt, answer = "A cat =", "meow the a of and is on in it"
    ctx, cont = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
    assert len(cont) >= 8
    (logp, n), = ev.answer_logprobs(model, [(prompt, answer)])
    row = (ctx + cont)[-8:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(row[1:])[:, None]).sum()
    assert n == 7 and logp == pytest.approx(float(expected), abs=1e-4)


def test_decode_batches_keep_the_cpu_sixteen_and_bound_a_devices_tokens() -> None:
    from gate.decoding import BATCH_SIZE, DEVICE_BATCH_SIZE, DEVICE_BATCH_TOKENS, decode_batches

    lengths = [(7 * i) % 40 + 1 for i in range(100)]
    cpu = decode_batches(lengths)
    assert [len(b) for b in cpu] == [BATCH_SIZE] * 6 + [4]  # as before: sorted, cut every 16
    flat = [i for b in cpu for i in b]
    assert flat == sorted(range(100), key=lambda i: lengths[i])
    gpu = decode_batches(lengths, "cuda:0")
    assert [i for b in gpu for i in b] == flat and [len(b) for b in gpu] == [DEVICE_BATCH_SIZE, 36]
    long = [300] * 40 + [5] * 10
    batches = decode_batches(long, "cuda")
    assert all(len(b) * max(long[i] for i in b) <= DEVICE_BATCH_TOKENS for b in batches)
    assert [len(b) for b in batches] == [27, 23]  # 10 short + 17 long (27 x 300 <= 8192), 23 long
    assert decode_batches(lengths, "cuda", batch_size=1) == [[i] for i in flat]


def test_evaluator_on_another_device_type_decodes_the_same_tokens(model_and_tokenizer) -> None:
    """The device batches (64 rows) give the CPU batches' tokens (float rounding aside:
    here the same CPU kernels, so exactly)."""
    import gate.evaluate as evaluate

    ev = Evaluator(world().base)
    model, _ = model_and_tokenizer
    prompts = PROMPTS * 4
    budgets = [3 + i % 6 for i in range(len(prompts))]
    expected = ev.generate_many(model, prompts, budgets)
    seen: list[list[int]] = []
    real = evaluate.decode_batches

    def as_device(lengths, device, batch_size):  # type: ignore[no-untyped-def]
        out = real(lengths, "cuda", batch_size)
        seen.extend(out)
        return out

    evaluate.decode_batches = as_device
    try:
        assert ev.generate_many(model, prompts, budgets) == expected
    finally:
        evaluate.decode_batches = real
    assert [len(b) for b in seen] == [len(prompts)]  # one batch instead of two
