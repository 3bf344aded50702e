"""GPT-2 (Conv1D) and tied-embedding adapters read the same by the gate, PEFT and unload.

Found by a regression QA pass over this round's fixes:

* PEFT transposes ``Conv1D`` weights whatever ``fan_in_fan_out`` says, and saves ``false``
  for a GPT-2 adapter that also targets ``lm_head``: unload added ``Δ`` untransposed on a
  square ``c_proj`` (0.175 off) and refused a non-square ``c_attn``;
* on GPT-2 PEFT cannot tie ``wte``'s LoRA to ``lm_head`` and saves the embedding side only;
  unload kept the tie (the output layer changed too) while PEFT's forward, which the gate
  now scores, changes the input side alone;
* merge equivalence on a tied base added an embedding delta into the shared weight (so
  into ``lm_head`` too) and refused PEFT's saved base-weight copies: a correct linear
  merge failed the gate;
* ``"dtype": "auto"`` crashed quantize (exit 70).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gate.evaluate import Evaluator
from merging.lora.engine import merge_adapters
from merging.lora.peft_output import write_peft_dir
from merging.model.quantize import quantize
from merging.model.unload import unload
from registry.errors import BadInputError
from tests.support.cli import run
from tests.support.unload import PROBE, load_model, logits, make_adapter, make_base, peft_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _gpt2(path: Path, *, tie: bool) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64,
                        tie_word_embeddings=tie)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _peft_adapter(base: Path, out: Path, targets: list[str], **options: object) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                        init_lora_weights=False, **options))
    model.save_pretrained(out)
    return out


def _agree(adapter: Path, base: Path, out: Path) -> None:
    unload(str(adapter), str(base), str(out), sync=False)
    reference = logits(peft_model(base, adapter))
    with torch.no_grad():
        gated = Evaluator(base).with_adapter("c", adapter)(PROBE).logits.float()
    shipped = logits(load_model(out))
    assert torch.allclose(gated, reference, atol=1e-5, rtol=0)
    assert torch.allclose(shipped, reference, atol=1e-4, rtol=0), float((shipped - reference).abs().max())


@pytest.mark.parametrize("targets", [["attn.c_proj", "lm_head"], ["c_attn", "lm_head"]])
def test_conv1d_weights_are_transposed_whatever_the_saved_flag(tmp_path, capsys, targets):
    base = _gpt2(tmp_path / "base", tie=False)
    adapter = _peft_adapter(base, tmp_path / "ad", targets)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    _agree(adapter, base, tmp_path / "out")
    store = tmp_path / "store"
    assert run(capsys, "init", store)[0] == 0
    code, _, err = run(capsys, "push", adapter, "--name", "g", "--base", base, "--store", store)
    assert code == 0, err


def test_a_gpt2_embedding_lora_peft_could_not_tie_changes_the_input_side_only(tmp_path):
    base = _gpt2(tmp_path / "base", tie=True)
    adapter = _peft_adapter(base, tmp_path / "ad", ["wte", "c_attn"], fan_in_fan_out=True,
                            ensure_weight_tying=True)
    _agree(adapter, base, tmp_path / "out")


def test_merge_equivalence_reference_on_a_tied_base_is_peft_unmerged(tmp_path):
    base = make_base(tmp_path / "base", tie=True, hidden=32, layers=1)
    parts = [make_adapter(base, tmp_path / f"ad{i}", targets=("embed_tokens", "v_proj"), seed=i)
             for i in (1, 2)]
    merged = write_peft_dir(merge_adapters(parts, [0.5, 0.5], "linear"), tmp_path / "merged")
    ev = Evaluator(base)
    with torch.no_grad():
        reference = ev.with_deltas("parents", [(p, 0.5) for p in parts])(PROBE).logits.float()
        candidate = ev.with_adapter("candidate", merged)(PROBE).logits.float()
    assert torch.allclose(candidate, reference, atol=1e-4, rtol=0), float((candidate - reference).abs().max())


def test_a_config_dtype_transformers_cannot_build_is_bad_input(tmp_path):
    base = make_base(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "auto"}))
    with pytest.raises(BadInputError, match="dtype 'auto' is not a floating-point dtype"):
        quantize(base, "nf4", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
