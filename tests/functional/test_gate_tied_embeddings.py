"""The gate scores what ships for adapters on a base's tied embeddings (a consumers QA pass).

On a base whose ``lm_head`` shares the embedding's weight, PEFT's ``merge_and_unload``
adds each side's delta into that one weight: an ``lm_head`` LoRA reached the input side
too and a tied pair's delta landed twice, so the gate scored a model that neither PEFT's
own forward nor ``adapters unload`` produces (logits 0.5 apart). And the structural check
failed every model ``unload`` had untied (documented behaviour), so it could never pass.
The reference is PEFT's unmerged forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli.main import main
from gate.evaluate import Evaluator
from merging.adapter import load_adapter
from merging.lora.live import LiveLora, rank_bound
from merging.model.unload import unload
from registry.errors import UnsupportedAdapterError
from tests.support.unload import PROBE, load_model, logits, make_adapter, make_base, peft_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-tied")
    base = make_base(root / "base", tie=True, hidden=32, layers=1)
    return {"root": root, "base": base,
            "head": make_adapter(base, root / "head", targets=("lm_head", "q_proj")),
            "pair": make_adapter(base, root / "pair", targets=("embed_tokens", "q_proj"),
                                 ensure_weight_tying=True)}


@pytest.mark.parametrize("kind", ["head", "pair"])
def test_the_gate_model_equals_peft_and_the_unloaded_model(world, kind):
    adapter = world[kind]
    with torch.no_grad():
        gated = Evaluator(world["base"]).with_adapter("candidate", adapter)(PROBE).logits.float()
    reference = logits(peft_model(world["base"], adapter))
    out = world["root"] / f"unloaded-{kind}"
    unload(str(adapter), str(world["base"]), str(out), sync=False)
    shipped = logits(load_model(out))
    assert torch.allclose(gated, reference, atol=1e-5, rtol=0), float((gated - reference).abs().max())
    assert torch.allclose(shipped, reference, atol=1e-4, rtol=0)


def test_an_untied_unload_passes_the_structural_check(world, tmp_path, capsys):
    out = tmp_path / "unloaded"
    unload(str(world["head"]), str(world["base"]), str(out), sync=False)  # unties (documented)
    policy = tmp_path / "gate.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "checks": [{"kind": "structural"}]}))
    code = main(["gate", str(out), "--base", str(world["base"]), "--policy", str(policy), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["checks"][0]["metrics"]["structure"] == "match (embeddings untied)"


def test_merge_search_refuses_lora_on_tied_embeddings(world):
    with pytest.raises(UnsupportedAdapterError, match="LoRA on embeddings or lm_head"):  # PEFT's copy
        rank_bound([load_adapter(world["head"])])
    with pytest.raises(UnsupportedAdapterError, match="tied embeddings"):  # and without it
        LiveLora.attach(load_model(world["base"]), {"base_model.model.lm_head": 4})
