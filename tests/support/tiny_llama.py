"""The one tiny Llama builder of the suite: a config, a seeded model, a saved model.

Every test that needs a real ``LlamaForCausalLM`` (a base to fingerprint, a PEFT round
trip, a merge to unload, a gate world to train) builds it here, from
:data:`TINY_LLAMA` with keyword overrides. Areas that need another shape keep it as a
named preset next to their helpers (``tests.support.ingest.INGEST_LLAMA``,
``tests.support.merge.MERGE_LLAMA``, ``tests.support.hub.HUB_LLAMA``...), passed as
the first argument; keyword overrides win over the preset, which wins over the
defaults. The shapes differ on purpose and must not be unified: stored expectations
(fingerprints, PEFT logits, shard layouts) were made with each area's numbers.

Weights come from ``torch.manual_seed(seed)`` just before the model is made, so a
(preset, overrides, seed) triple always saves the same bytes. torch and transformers
are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA: Mapping[str, Any] = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
"""The default shape: 2 layers, grouped-query attention (4 heads, 2 KV heads), untied."""


def tiny_llama_config(preset: Mapping[str, Any] | None = None, /,
                      **overrides: Any) -> LlamaConfig:
    """A ``LlamaConfig``: :data:`TINY_LLAMA`, then ``preset``, then ``overrides``.

    Args:
        preset: An area's shape (keys of ``LlamaConfig``), over the defaults.
        **overrides: ``LlamaConfig`` keywords over both.

    Raises:
        TypeError: A keyword ``LlamaConfig`` refuses.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **(preset or {}), **overrides})


def tiny_llama(preset: Mapping[str, Any] | None = None, /, *, seed: int = 0,
               **overrides: Any) -> LlamaForCausalLM:
    """A randomly initialised tiny ``LlamaForCausalLM`` in eval mode, float32.

    Args:
        preset: See :func:`tiny_llama_config`.
        seed: Seeds torch's global generator right before the weights are drawn.
        **overrides: See :func:`tiny_llama_config`.

    Raises:
        TypeError: A keyword ``LlamaConfig`` refuses.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(preset, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(out_dir: Path, preset: Mapping[str, Any] | None = None, /, *,
                    seed: int = 0, max_shard_size: str | None = None,
                    **overrides: Any) -> Path:
    """Save :func:`tiny_llama` with ``save_pretrained`` (safetensors) into ``out_dir``.

    Args:
        out_dir: Created if missing; returned.
        preset: See :func:`tiny_llama_config`.
        seed: See :func:`tiny_llama`.
        max_shard_size: ``save_pretrained``'s shard limit (e.g. ``"8KB"``); one file if None.
        **overrides: See :func:`tiny_llama_config`.

    Raises:
        TypeError: A keyword ``LlamaConfig`` refuses.
        OSError: ``out_dir`` cannot be written.
    """
    model = tiny_llama(preset, seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)
