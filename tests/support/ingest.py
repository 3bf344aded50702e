"""Builders for ingestion tests: the tiny Llama shape, PEFT adapters, small safetensors files.

torch, transformers and peft are imported inside the functions that need them, so
tests that only build raw bytes stay fast; bytes are written with
:mod:`tests.support.safetensors_files`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.safetensors_files import RawTensor, f32, safetensors_bytes, write_safetensors
from tests.support.tiny_llama import tiny_llama

INGEST_LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                "num_key_value_heads": 1}
"""The ingestion and fingerprint tests' shape (a :func:`tests.support.tiny_llama.tiny_llama`
preset): hidden 16, so an 8 KB shard limit splits the base into several files."""


def save_adapter(
    out_dir: Path,
    *,
    seed: int = 0,
    base_overrides: dict[str, Any] | None = None,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Any = ("q_proj", "v_proj"),
    **lora_kwargs: Any,
) -> Path:
    """Save a PEFT LoRA adapter for a tiny Llama, with non-zero random A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(INGEST_LLAMA, seed=seed, **(base_overrides or {}))
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


PEFT_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": None,
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "inference_mode": True,
}


def handmade_adapter(out_dir: Path, *, layers: int = 2, r: int = 4, hidden: int = 16) -> Path:
    """A PEFT-shaped LoRA adapter for :data:`INGEST_LLAMA`'s q_proj, without torch or peft.

    Same key names, shapes, dtype and config fields as ``save_adapter(...,
    target_modules=("q_proj",))`` writes; the values are a fixed ramp.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, RawTensor] = {}
    for layer in range(layers):
        module = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        for suffix, shape in ((".lora_A.weight", [r, hidden]), (".lora_B.weight", [hidden, r])):
            count = shape[0] * shape[1]
            values = [((i * 37 + layer) % 11 - 5) / 50 for i in range(count)]
            tensors[module + suffix] = ("F32", shape, f32(values))
    write_safetensors(out_dir / "adapter_model.safetensors", dict(sorted(tensors.items())),
                      metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps({**PEFT_CONFIG, "r": r}, indent=2))
    (out_dir / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    return out_dir


def small_valid_file() -> bytes:
    """A small well-formed file with three tensors of different dtypes."""
    return safetensors_bytes(
        {
            "a.weight": ("F32", [2, 3], bytes(range(24))),
            "b.bias": ("F16", [3], b"\x01\x02\x03\x04\x05\x06"),
            "c": ("I64", [1], b"\x07" * 8),
        },
        metadata={"format": "pt"},
    )
