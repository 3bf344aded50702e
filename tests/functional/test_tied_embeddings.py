"""Tied embeddings with PEFT's ``ensure_weight_tying`` through merge and unload (QA fuzz pass).

PEFT saves the tied LoRA twice (embedding and ``lm_head``, transposed). Two bugs:

* merging such adapters with DARE or DELLA drew each side's masks apart, so the merged
  ``lm_head`` delta was not the embedding's (0.8 relative difference) while the output
  still said ``ensure_weight_tying``; PEFT and ``unload`` then used different sides;
* an adapter whose two sides differ (peft unties them when training on a 16-bit base)
  was unloaded with the embedding's delta only, matching neither PEFT reading of it.

The reference is PEFT itself: the merged adapter applied by ``PeftModel`` on the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main
from merging.adapter import load_adapter
from merging.lora.engine import merge_adapters
from merging.lora.peft_output import write_peft_dir
from merging.model.unload import unload
from tests.support.unload import load_model, logits, make_adapter, make_base, peft_model

P = "base_model.model."
EMBED_A, EMBED_B = P + "model.embed_tokens.lora_embedding_A", P + "model.embed_tokens.lora_embedding_B"
HEAD_A, HEAD_B = P + "lm_head.lora_A.weight", P + "lm_head.lora_B.weight"
TIED_TARGETS = ("embed_tokens", "q_proj", "v_proj")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = make_base(root / "base", tie=True, hidden=32, layers=1)
    return {"root": root, "base": base,
            "a": make_adapter(base, root / "a", targets=TIED_TARGETS, ensure_weight_tying=True, seed=1),
            "b": make_adapter(base, root / "b", targets=TIED_TARGETS, ensure_weight_tying=True, seed=2),
            "head_only": make_adapter(base, root / "head", targets=("lm_head", "q_proj"), seed=3)}


def _embed_and_head_deltas(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    embed = (tensors[EMBED_B].float() @ tensors[EMBED_A].float()).T
    return embed, tensors[HEAD_B].float() @ tensors[HEAD_A].float()


@pytest.mark.parametrize("method", ["dare_ties", "della", "dare_linear", "ties", "breadcrumbs_ties"])
def test_a_merge_of_tied_adapters_keeps_one_lora_for_both_sides(world, method, tmp_path):
    result = merge_adapters([world["a"], world["b"]], [1.0, 0.8], method, params={"density": 0.5})
    embed, head = _embed_and_head_deltas(result.tensors)
    assert torch.equal(head, embed) and embed.norm() > 0
    assert result.config["ensure_weight_tying"] is True
    assert result.report["modules"][P + "lm_head"]["mirrors"] == P + "model.embed_tokens"
    out = write_peft_dir(result, tmp_path / "merged")
    unload(str(out), str(world["base"]), str(tmp_path / "unloaded"), sync=False)
    reference = logits(peft_model(world["base"], out))
    got = logits(load_model(tmp_path / "unloaded"))
    assert torch.allclose(got, reference, atol=1e-4, rtol=0), float((got - reference).abs().max())


def test_a_tied_and_an_untied_lm_head_merge_as_two_loras(world, tmp_path):
    result = merge_adapters([world["a"], world["head_only"]], None, "dare_ties", params={"density": 0.5})
    embed, head = _embed_and_head_deltas(result.tensors)
    assert not torch.allclose(head, embed)  # the second input changes lm_head alone
    assert result.config["ensure_weight_tying"] is False  # PEFT must not tie them on load
    out = write_peft_dir(result, tmp_path / "merged")
    unload(str(out), str(world["base"]), str(tmp_path / "unloaded"), sync=False)
    reference = logits(peft_model(world["base"], out))
    got = logits(load_model(tmp_path / "unloaded"))
    assert torch.allclose(got, reference, atol=1e-4, rtol=0), float((got - reference).abs().max())


def _untied_copy(src: Path, dst: Path) -> Path:
    """``src`` with its lm_head LoRA no longer the embedding's (what peft saves after training
    on a bfloat16 base: the shared storage was broken by a float32 cast)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(src / "adapter_model.safetensors")
    tensors[HEAD_A] = tensors[HEAD_A] + 0.01
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_an_adapter_whose_tied_sides_differ_is_refused_by_unload_on_a_tied_base(world, tmp_path, capsys):
    bad = _untied_copy(world["a"], tmp_path / "untied")
    code = main(["unload", str(bad), "--base", str(world["base"]), "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and "LoRAs differ" in err and '"ensure_weight_tying": false' in err
    assert not (tmp_path / "u").exists()


def test_a_merge_takes_differing_tied_sides_as_two_loras(world, tmp_path):
    bad = _untied_copy(world["a"], tmp_path / "untied")
    result = merge_adapters([bad, world["b"]], None, "ties")
    embed, head = _embed_and_head_deltas(result.tensors)
    assert not torch.allclose(head, embed) and result.config["ensure_weight_tying"] is False
    assert any("merged as two LoRAs" in w for w in result.report["warnings"])
    assert load_adapter(bad).config["ensure_weight_tying"] is True  # loading refuses nothing


def test_on_an_untied_base_differing_sides_are_applied_as_peft_does(world, tmp_path):
    base = make_base(tmp_path / "untied-base", tie=False, hidden=32, layers=1)
    adapter = make_adapter(base, tmp_path / "ad", targets=("embed_tokens", "lm_head", "q_proj"),
                           ensure_weight_tying=True, seed=4)
    unload(str(adapter), str(base), str(tmp_path / "unloaded"), sync=False)
    got = logits(load_model(tmp_path / "unloaded"))
    reference = logits(peft_model(base, adapter))
    assert torch.allclose(got, reference, atol=1e-4, rtol=0), float((got - reference).abs().max())


def test_the_documented_fix_unloads_the_two_loras_as_saved(world, tmp_path):
    fixed = _untied_copy(world["a"], tmp_path / "untied")
    config = json.loads((fixed / "adapter_config.json").read_text())
    config.update(ensure_weight_tying=False, target_modules=[*config["target_modules"], "lm_head"])
    (fixed / "adapter_config.json").write_text(json.dumps(config))
    unload(str(fixed), str(world["base"]), str(tmp_path / "unloaded"), sync=False)
    got = logits(load_model(tmp_path / "unloaded"))
    reference = logits(peft_model(world["base"], fixed))  # two LoRAs, applied separately
    assert torch.allclose(got, reference, atol=1e-4, rtol=0), float((got - reference).abs().max())
