"""The module types of a model, from its config alone: which weights are ``Conv1D``.

PEFT transposes a LoRA delta (``fan_in_fan_out``) on ``Conv1D`` modules and on no others,
whatever the adapter's config says; safetensors headers cannot tell a ``Conv1D`` weight
(stored ``(in, out)``) from a ``Linear`` one (``(out, in)``) when it is square, and a
transposed ``Linear`` adapter looks like a ``Conv1D`` one when it is not. The model is
built on the meta device (no memory, no weights read); torch and transformers are
imported only when this is called, so ``registry`` stays fast to import.
"""

from __future__ import annotations

import functools
import json
from typing import Any


def conv1d_weights(config: dict[str, Any]) -> set[str] | None:
    """Weight keys of the ``Conv1D`` modules of the model ``config`` describes, or None
    when the model cannot be built (an unknown architecture).

    PEFT decides per module whether a LoRA delta is transposed: ``fan_in_fan_out`` is
    forced to True on a ``Conv1D`` and to False on a ``Linear`` (with a warning), whatever
    the adapter's config says. The skeleton is built on the meta device: no memory, no
    weights read.
    """
    model = skeleton(config)
    if model is None:
        return None
    return {f"{name}.weight" for name, module in model.named_modules()
            if type(module).__name__ == "Conv1D"}


def untied_output_weight(config: dict[str, Any]) -> str | None:
    """The weight key of the output embedding (``lm_head.weight``) when the model keeps
    it apart from the input embedding, else None (tied, none, or unknown architecture)."""
    model = skeleton(config)
    head = model.get_output_embeddings() if model is not None else None
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def output_layer(model: Any) -> str | None:
    """The module name of ``model``'s output layer (``lm_head``), tied or not; None if it has none."""
    head = model.get_output_embeddings() if model is not None else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def output_layer_name(config: dict[str, Any]) -> str | None:
    """:func:`output_layer` of the model ``config`` describes (None: unknown architecture)."""
    return output_layer(skeleton(config))


def model_class(config: dict[str, Any]) -> tuple[Any, Any]:
    """``(model class, transformers config)`` for ``config`` (its ``architectures``, else the
    causal-LM class of its ``model_type``); a ``quantization_config`` is left out.

    Raises:
        Whatever transformers raises for a config it cannot read (ValueError, KeyError...).
    """
    import transformers

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    archs = cfg_dict.get("architectures") or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    return model_cls or transformers.AutoModelForCausalLM._model_mapping[type(cfg)], cfg


def skeleton(config: dict[str, Any]) -> Any:
    """The model ``config`` describes, built on the meta device, or None if it cannot be.

    Built once per config in a process (unload, its shape check and quantize each ask).
    """
    return _skeleton(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _skeleton(config_json: str) -> Any:
    import torch

    try:
        model_cls, cfg = model_class(json.loads(config_json))
        with torch.device("meta"):
            return model_cls(cfg)
    except Exception:  # noqa: BLE001 - any failure to build means: not known here
        return None
