"""Tiny models and adapters for the merge-and-unload and requantization tests.

Everything is built from a config with random weights (seeded), saved with
``save_pretrained`` exactly as a downloaded model would be, so the tests exercise
real transformers/PEFT files without any network access. The module-scoped fixtures
that save the default base once per test module (``work``, ``base``) live in
:mod:`tests.plugins.unload`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.support.tiny_llama import tiny_llama

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROBE = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127], [3, 3, 70, 2, 90, 11, 42, 7]])
UNLOAD_LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128}
"""The unload tests' base (a :func:`tests.support.tiny_llama.tiny_llama` preset)."""
EXTRA_FILES = {
    "tokenizer_config.json": '{"model_max_length": 64, "chat_template": "{{ messages }}"}\n',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
}


def make_base(path: Path, *, dtype: torch.dtype = torch.float32, tie: bool = False,
              max_shard_size: str | None = None, seed: int = 0, hidden: int = 64,
              layers: int = 2) -> Path:
    """Save a random tiny Llama (:data:`UNLOAD_LLAMA`, intermediate size ``2 * hidden``),
    its norms perturbed, plus tokenizer-ish files, to ``path``."""
    model = tiny_llama(UNLOAD_LLAMA, seed=seed, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, tie_word_embeddings=tie).to(dtype)
    with torch.no_grad():  # norms are all ones after init: make them distinguishable
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    for name, text in EXTRA_FILES.items():
        (path / name).write_text(text)
    return path


def make_adapter(base_dir: Path, path: Path, *, r: int = 4, alpha: float = 8,
                 targets: tuple[str, ...] = LINEAR_TARGETS, modules_to_save: list[str] | None = None,
                 use_rslora: bool = False, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None, seed: int = 1, std: float = 0.05,
                 ensure_weight_tying: bool = False, load_in_4bit: bool = False) -> Path:
    """Wrap the base with PEFT, give every trainable tensor random values, save."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(base_dir, load_in_4bit=load_in_4bit)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                        modules_to_save=modules_to_save, use_rslora=use_rslora,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        ensure_weight_tying=ensure_weight_tying)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param, dtype=torch.float32) * std)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * std)
    peft_model.save_pretrained(path)
    return path


def load_model(model_dir: Path, *, load_in_4bit: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on CPU, eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", **kwargs)
    return model.eval()


def exact_cpu_4bit(model: Any) -> Any:
    """Make bitsandbytes' CPU Linear4bit compute in float32 (dequantize, then matmul).

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights at the first
    forward and computes in bfloat16 (~2e-3 logits noise here); a reference model must
    switch that off before its first forward.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def logits(model: Any, ids: torch.Tensor = PROBE) -> torch.Tensor:
    """Float32 logits of a model on the probe batch."""
    with torch.no_grad():
        return model(ids).logits.float()


def peft_model(base_dir: Path, adapter_dir: Path, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained(base, adapter)`` in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir, **kwargs), adapter_dir).eval()


def state_of(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory (all shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def shard_layout(model_dir: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """File name -> tensor name -> (dtype, shape), from headers."""
    from registry.formats.safetensors_header import read_header

    return {f.name: {n: (i.dtype, i.shape) for n, i in read_header(f).tensors.items()}
            for f in sorted(model_dir.glob("*.safetensors"))}


def leftovers(parent: Path, out_name: str) -> list[str]:
    """Entries of ``parent`` that look like a staging directory of ``out_name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.tmp-"))
