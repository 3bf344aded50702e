"""Logits drift of a quantized model: how far its outputs moved from the float model's.

A fixed probe batch (:data:`PROBE_SHAPE` token ids drawn with :data:`PROBE_SEED`) is run
through the unquantized model, rebuilt from the tensors the rewrite kept
(:func:`reference_logits`), and through the written model as transformers loads it
(:func:`load_logits`); :func:`logits_drift` compares the two. The probe holds the
unquantized model in memory, so :mod:`merging.model.execute` runs it by default only on
models up to :data:`PROBE_MAX_BYTES`. transformers is imported inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

PROBE_SHAPE = (2, 16)
PROBE_SEED = 0
PROBE_MAX_BYTES = 2 << 30
"""Logits drift is measured by default only for models up to this many weight bytes
(the probe holds the unquantized model in memory)."""


def probe_ids(vocab_size: int) -> torch.Tensor:
    """The fixed probe batch: ``PROBE_SHAPE`` token ids drawn with ``PROBE_SEED``."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=gen)


def logits_drift(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Drift of ``other`` logits from ``reference`` (same probe batch)."""
    ref, oth = reference.double(), other.double()
    diff = oth - ref
    return {"max_abs": float(diff.abs().max()), "mean_abs": float(diff.abs().mean()),
            "relative_fro": float(diff.norm() / ref.norm().clamp_min(1e-30)),
            "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
            "probe_tokens": int(math.prod(PROBE_SHAPE))}


def reference_logits(config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the unquantized model built from ``config`` and a full state dict.

    Raises:
        RuntimeError: the state dict does not cover the model's parameters.
    """
    from transformers.initialization import no_init_weights

    from registry.formats.architecture import model_class

    model_cls, cfg = model_class(config)
    dtype = config_dtype(config) or next(iter(state.values())).dtype
    with no_init_weights():
        model = model_cls(cfg).to(dtype)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if tied & set(state) and head is not None and embed is not None and head.weight is embed.weight:
        # both sides are in the checkpoint: from_pretrained then keeps them apart (it warns
        # if they differ), so untie before loading, or the last one loaded would win
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"reference model: missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    if set(missing) & tied:  # tie only what the checkpoint lacks: transformers does not tie
        model.tie_weights()   # (it warns) when both tensors are there and differ
    model.eval()
    with torch.no_grad():
        return model(probe_ids(cfg.get_text_config().vocab_size)).logits.float()


def load_logits(model_dir: Path, **kwargs: Any) -> torch.Tensor:
    """Logits of ``from_pretrained(model_dir)`` (CPU) on the probe batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", **kwargs)
    for module in model.modules():
        # bitsandbytes' AVX512-BF16 CPU path repacks absmax per row and fails when a row is
        # not a whole number of blocks (hidden 96, blocksize 64); the gate turns it off too
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # a plain bool flag; torch's stubs type Module attributes as Tensor | Module
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    with torch.no_grad():
        return model(probe_ids(vocab)).logits.float()


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The ``dtype`` (or legacy ``torch_dtype``) a model config names, if any."""
    value = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, value, None) if isinstance(value, str) else None


def probe_written(stage: Path, config: dict[str, Any], state: dict[str, torch.Tensor]
                  ) -> dict[str, Any]:
    """Logits drift of the written (quantized) model in ``stage`` vs the unquantized
    tensors ``state`` (emptied as soon as the reference logits are taken).

    Never raises: the probe is a report, not a requirement; a failure becomes
    ``{"skipped": "<error>"}``.
    """
    try:
        reference = reference_logits(config, state)
        state.clear()
        drift = logits_drift(reference, load_logits(stage))
    except Exception as err:  # noqa: BLE001 - the probe is a report, not a requirement
        return {"skipped": f"{type(err).__name__}: {str(err)[:200]}"}
    return {"batch": list(PROBE_SHAPE), **drift}
