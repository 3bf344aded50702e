"""Helpers for the CLI functional tests: run the CLI in-process, build inputs on disk.

Two kinds of inputs:

* *synthetic* PEFT adapters and base models written with numpy + safetensors
  (no torch: milliseconds, and usable in the no-torch start-up checks). Their
  tensor names and shapes follow what PEFT writes for a Llama:
  ``base_model.model.model.layers.{i}.self_attn.{m}.lora_A.weight`` is ``(r, in)``,
  ``lora_B.weight`` is ``(out, r)``, base weights ``model.layers.{i}.self_attn.{m}.weight``
  are ``(out, in)``;
* a real tiny Llama (:func:`tests.support.tiny_llama.tiny_llama`, default shape) with a
  PEFT LoRA whose B is non-zero, for the round trip through
  ``PeftModel.from_pretrained`` (torch/peft imported inside).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from tests.support.tiny_llama import tiny_llama

HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run ``adapters ARGS`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, Any]:
    """Run ``adapters ARGS --json``; return (exit code, parsed stdout)."""
    code, out, err = run(capsys, *args, "--json")
    try:
        return code, json.loads(out)
    except ValueError as exc:
        raise AssertionError(f"--json output does not parse (exit {code}):\n{out}\n{err}") from exc


def tree_bytes(root: Path) -> int:
    """Total size of the regular files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def make_writable(path: Path) -> None:
    """Blobs are 0444 once written; let a test tamper with one."""
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_synthetic_base(out_dir: Path, *, hidden: int = 16, layers: int = 2, seed: int = 0) -> Path:
    """A Llama-shaped base model dir (config.json + model.safetensors), attention only."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((32, hidden), dtype=np.float32)}
    for i in range(layers):
        for m in LLAMA_MODULES:
            tensors[f"model.layers.{i}.self_attn.{m}.weight"] = rng.standard_normal(
                (hidden, hidden), dtype=np.float32
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "vocab_size": 32}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def write_synthetic_adapter(
    out_dir: Path, *, hidden: int = 16, layers: int = 2, r: int = 4, seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"), pickle: bool = False,
) -> Path:
    """A PEFT LoRA adapter dir for :func:`write_synthetic_base` (different seeds: different bytes).

    ``pickle=True`` writes ``adapter_model.bin`` (opaque bytes, never loaded) instead
    of safetensors, for the refusal test.
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for m in targets:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "base_model_name_or_path": "tiny-llama", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if pickle:
        (out_dir / "adapter_model.bin").write_bytes(b"\x80\x04not-a-real-pickle.")
    else:
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def build_tiny_peft(base_dir: Path, adapter_dir: Path, *, seed: int = 1,
                    safe_serialization: bool = True) -> Any:
    """Save a tiny Llama to ``base_dir`` and a LoRA with non-zero B to ``adapter_dir``.

    Returns the PeftModel (eval mode) whose logits the round trip must reproduce.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    base.save_pretrained(base_dir, safe_serialization=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:  # PEFT initialises B to zero: make the adapter matter
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    model.save_pretrained(adapter_dir, safe_serialization=safe_serialization)
    return model


def heavy_modules_after(code: str, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which HEAVY_MODULES it imported."""
    import subprocess
    import sys

    probe = (
        f"{code}\nimport sys, json\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))"
    )
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
