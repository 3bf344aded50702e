"""A model directory with a real model's shapes and tokenizer but seeded random weights.

Benchmarks that time a model (the gate, the merge search) need the real model's shapes
and tokenizer; its trained weights only change the scores, not what a forward pass
costs. A GPU machine that cannot receive the 0.5 GB SmolLM2 float32 checkpoint (only a
few MiB travel there) gets the converted model's ``config.json`` and tokenizer files and
builds the weights from the config here. Scores measured on such a model are noise and
the scripts say so; the timings compare two code paths on the same model. One caveat:
a random model rarely emits EOS, so every generation runs to its token limit (an upper
bound on the trained model's generation time, the same for both paths compared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
"""Either one present means the directory already holds weights."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def has_weights(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a safetensors checkpoint."""
    return any((Path(model_dir) / name).is_file() for name in WEIGHT_FILES)


def materialize(config_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """``config_dir`` itself if it has weights, else ``out`` with seeded random weights.

    The weights are transformers' own initialisation of ``config.json`` (float32) under
    ``torch.manual_seed(seed)``; the tokenizer files are copied alongside.

    Raises:
        FileNotFoundError: ``config_dir`` has no ``config.json``.
    """
    config_dir, out = Path(config_dir), Path(out)
    if has_weights(config_dir):
        return config_dir
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"{config_dir}: no config.json (a model directory is needed)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file():
            shutil.copy2(config_dir / name, out / name)
    return out
