"""Round trip through the store with a real PEFT model (issue 2).

A tiny Llama built from ``LlamaConfig`` gets a LoRA with non-zero B; its adapter is
pushed with ``adapters push --base``, exported with ``adapters export``, and
``PeftModel.from_pretrained`` on the exported directory must give bit-identical
logits to the original PeftModel. A ``.bin`` (pickle) save goes the same way with
``--allow-pickle`` (converted to safetensors on the way in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import build_tiny_peft, run_json

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    base_dir, adapter_dir, bin_dir = root / "base", root / "adapter", root / "adapter-bin"
    model = build_tiny_peft(base_dir, adapter_dir)
    model.save_pretrained(bin_dir, safe_serialization=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"root": root, "base": base_dir, "adapter": adapter_dir, "bin": bin_dir,
            "ids": ids, "logits": logits}


def load_exported(base_dir: Path, exported: Path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, exported).eval()


def front_matter(readme: str) -> dict:
    import yaml

    assert readme.startswith("---\n"), readme[:80]
    head, sep, _ = readme[4:].partition("\n---")
    assert sep, "front matter is not closed"
    return yaml.safe_load(head)


def test_push_export_from_pretrained_identical_logits(world, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_json(capsys, "init", "--store", store)[0] == 0
    code, pushed = run_json(capsys, "push", world["adapter"], "--name", "tiny/lora",
                            "--base", world["base"], "--base-model", "tiny/llama",
                            "--alias", "candidate", "--store", store)
    assert code == 0 and pushed["created"] is True, pushed
    code, fp = run_json(capsys, "fingerprint", world["base"])
    code, shown = run_json(capsys, "show", "tiny/lora:candidate", "--store", store)
    assert shown["record"]["base_model"]["fingerprint"] == {
        "struct_digest": fp["struct_digest"], "weights_digest": fp["weights_digest"]}
    assert shown["record"]["peft"]["r"] == 4

    out_dir = tmp_path / "exported"
    code, exported = run_json(capsys, "export", "tiny/lora:candidate", out_dir, "--store", store)
    assert code == 0 and exported["ref"] == pushed["version"]["ref"]
    model = load_exported(world["base"], out_dir)
    with torch.no_grad():
        logits = model(input_ids=world["ids"]).logits
    assert torch.equal(logits, world["logits"])

    meta = front_matter((out_dir / "README.md").read_text())
    assert meta["base_model"] == "tiny/llama"
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert json.loads((out_dir / "adapter_config.json").read_text()) == \
        json.loads((world["adapter"] / "adapter_config.json").read_text())
    assert run_json(capsys, "verify", "--all", "--store", store)[0] == 0


def test_pickle_adapter_needs_allow_pickle_and_round_trips(world, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_json(capsys, "init", "--store", store)[0] == 0
    code, err = run_json(capsys, "push", world["bin"], "--name", "tiny/bin", "--store", store)
    assert code == 2 and "--allow-pickle" in (err["fix"] or "") + err["message"]

    code, pushed = run_json(capsys, "push", world["bin"], "--name", "tiny/bin", "--allow-pickle",
                            "--base", world["base"], "--store", store)
    assert code == 0, pushed
    paths = {f["path"] for f in pushed["version"]["files"]}
    assert "adapter_model.safetensors" in paths and "adapter_model.bin" not in paths

    out_dir = tmp_path / "exported-bin"
    assert run_json(capsys, "export", "tiny/bin", out_dir, "--store", store)[0] == 0
    model = load_exported(world["base"], out_dir)
    with torch.no_grad():
        logits = model(input_ids=world["ids"]).logits
    assert torch.equal(logits, world["logits"])
