"""The gate hands PEFT explicit module names, never the adapter's own patterns.

PEFT matches ``target_modules``, ``rank_pattern``... with Python's ``re`` when it loads
an adapter; a pattern that RE2 accepts (so ``push`` stores it) can still backtrack
exponentially there. :func:`registry.formats.patterns.explicit_peft_config` decides the targets
with RE2 and gives PEFT literal names. Checked against PEFT itself: the merged model
is bit-for-bit the one PEFT builds from the original config, and a backtracking
pattern no longer stalls the load.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.registry import PYTHON, REPO_ROOT, child_env

torch = pytest.importorskip("torch")

CHILD = """
import sys, torch
from gate.evaluate import Evaluator
model = Evaluator(sys.argv[1]).with_adapter("x", sys.argv[2])
torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[3])
"""


def _adapter(tmp_path: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model

    from tests.support.tiny_llama import tiny_llama

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_llama()
    base.save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|up_proj)",
                        rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 16},
                        exclude_modules=r".*layers\.0\.mlp\.up_proj")
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _peft_reference(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


def _gate_model(tmp_path: Path, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "merged.pt"
    done = subprocess.run([PYTHON, "-c", CHILD, str(base_dir), str(adapter_dir), str(out)],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_explicit_names_build_the_model_peft_builds(tmp_path: Path) -> None:
    base_dir, adapter_dir = _adapter(tmp_path)
    reference = _peft_reference(base_dir, adapter_dir)
    merged = _gate_model(tmp_path, base_dir, adapter_dir)
    assert merged.keys() == reference.keys()
    changed = [k for k in reference if not torch.equal(merged[k], reference[k])]
    assert changed == []
    # the adapter did change the weights it targets (and only those)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    touched = sorted(k for k in plain if not torch.equal(plain[k], merged[k]))
    assert "model.layers.0.mlp.up_proj.weight" not in touched  # excluded
    assert "model.layers.1.mlp.up_proj.weight" in touched
    assert "model.layers.0.self_attn.q_proj.weight" in touched


def test_a_backtracking_pattern_does_not_stall_the_gate(tmp_path: Path) -> None:
    base_dir, adapter_dir = _adapter(tmp_path)
    reference = _peft_reference(base_dir, adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # RE2 runs it in linear time and it matches nothing; Python's re backtracks
    # exponentially on every module name (measured: minutes for one name)
    config["rank_pattern"] = {"(.*.*)*x": 8, **config["rank_pattern"]}
    config_path.write_text(json.dumps(config))
    merged = _gate_model(tmp_path, base_dir, adapter_dir)
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
