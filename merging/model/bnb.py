"""bitsandbytes requantization that transformers' ``from_pretrained`` reads back.

Serialization (transformers 5.23 + bitsandbytes 0.50, checked against
``from_pretrained(quantization_config=BitsAndBytesConfig(...)).save_pretrained()`` in
``tests/functional/test_quantize.py``, tensor for tensor):

* 4-bit (nf4/fp4), for every ``nn.Linear`` weight transformers would convert:
  ``<m>.weight`` (packed ``uint8``, shape ``(numel/2, 1)``) plus the packed
  ``QuantState`` (``QuantState.as_dict(packed=True)``): ``<m>.weight.absmax``,
  ``<m>.weight.quant_map``, ``<m>.weight.quant_state.bitsandbytes__<nf4|fp4>`` (JSON
  of blocksize, dtype, shape) and with double quantization ``<m>.weight.nested_absmax``
  and ``<m>.weight.nested_quant_map``.
* int8 (LLM.int8, row-wise): ``<m>.weight`` (``int8``), ``<m>.SCB`` (float32 row
  scales) and ``<m>.weight_format`` (``uint8`` scalar 0 = row-major).
* ``config.json`` gains ``quantization_config`` = ``BitsAndBytesConfig(...).to_dict()``.

Which weights are converted is decided exactly as transformers does: the model is
built on the meta device from its config, and a ``nn.Linear`` (or ``Conv1D``, whose
weight is transposed first) is converted unless ``get_keys_to_not_convert`` (output
embedding, tied weights, last module), ``_keep_in_fp32_modules`` or
``llm_int8_skip_modules`` exclude it.

**Devices.** ``QuantSpec.device`` names where the conversion runs: on ``cuda`` each
weight is copied to the GPU, quantized there by bitsandbytes' CUDA kernels (what
``from_pretrained(..., device_map="cuda")`` runs when it loads the weight) and the
results come back to host memory before the next weight, so the GPU holds one weight
and its outputs at a time. The bytes are then those transformers writes on that
device; a CPU spec (the default) is unchanged, and is not mentioned in
:meth:`QuantSpec.to_json`, so CPU lineage records are what they were.

This module holds the primitives only, for one weight at a time: which weights are
converted (:func:`quantizable_weights`), what they become (:func:`planned_outputs`,
planned before writing), the conversion itself (:func:`quantize_weight`,
:func:`roundtrip` for QLoRA) and its error. The streaming rewrite
(:mod:`merging.model.execute`) calls them tensor by tensor, so peak memory is about one
module; :mod:`merging.model.quantize` is the entry point. bitsandbytes is imported
lazily (it takes seconds), transformers inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from merging.model.shard_plan import OutTensor
from registry.errors import BadInputError

METHODS = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QS_JSON_MAX = 512
"""Upper bound on the packed quant-state JSON (about 200 bytes in practice)."""


def _bnb():  # noqa: ANN202 - imported lazily: bitsandbytes takes ~6 s to import
    import bitsandbytes

    return bitsandbytes


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""``bnb_4bit_compute_dtype`` values accepted."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize.

    Attributes:
        method: ``nf4``, ``fp4`` or ``int8``.
        double_quant: Quantize the 4-bit absmax statistics too (QLoRA's default).
        blocksize: 4-bit block size (elements per absmax).
        compute_dtype: ``bnb_4bit_compute_dtype`` (default: the model's dtype).
        skip_modules: Extra ``llm_int8_skip_modules`` patterns.
        device: Where to quantize (a resolved torch device string: ``cpu``, ``cuda``,
            ``cuda:N``; :func:`merging.devices.resolve_device`).
    """

    method: str
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str | None = None
    skip_modules: tuple[str, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown quantization {self.method!r}",
                                fix=f"use one of {', '.join(METHODS)}")
        if self.blocksize not in BLOCKSIZES:
            raise BadInputError(f"blocksize {self.blocksize} is not supported by bitsandbytes",
                                fix=f"use one of {', '.join(map(str, BLOCKSIZES))}")
        if self.method == "int8" and self.double_quant:
            raise BadInputError("--double-quant applies to nf4/fp4 only", fix="drop --double-quant")
        if self.method == "int8" and self.blocksize != 64:  # was accepted and then dropped
            raise BadInputError("--blocksize applies to nf4/fp4 only", fix="drop --blocksize")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise BadInputError(f"compute dtype {self.compute_dtype!r} is not one bitsandbytes "
                                "computes in", fix=f"use one of {', '.join(COMPUTE_DTYPES)}")

    def check_source_dtype(self, st_dtype: str | None) -> None:
        """Refuse a source dtype bitsandbytes cannot quantize: 4-bit takes 16/32-bit floats
        (a float64 model crashed inside bitsandbytes, exit 70).

        Raises:
            BadInputError: A float64 model with nf4/fp4.
        """
        if self.four_bit and st_dtype == "F64":
            raise BadInputError(f"{self.method} quantizes float32, float16 or bfloat16 weights, "
                                "not float64", fix="re-save the model in float32 first, or use int8")

    @property
    def four_bit(self) -> bool:
        """nf4 or fp4."""
        return self.method != "int8"

    def bnb_config(self, model_dtype: torch.dtype) -> dict[str, Any]:
        """``BitsAndBytesConfig(...).to_dict()`` as transformers writes it into config.json."""
        from transformers import BitsAndBytesConfig

        skip = list(self.skip_modules) or None
        if not self.four_bit:
            cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            compute = getattr(torch, self.compute_dtype) if self.compute_dtype else model_dtype
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.method,
                                     bnb_4bit_use_double_quant=self.double_quant,
                                     bnb_4bit_compute_dtype=compute,
                                     bnb_4bit_quant_storage=torch.uint8,
                                     llm_int8_skip_modules=skip)
        return cfg.to_dict()

    def to_json(self) -> dict[str, Any]:
        """JSON form (reports, lineage); ``device`` only when it is not the CPU."""
        out = {"method": self.method, "double_quant": self.double_quant,
               "blocksize": self.blocksize if self.four_bit else None,
               "compute_dtype": self.compute_dtype, "skip_modules": list(self.skip_modules)}
        if self.device != "cpu":
            out["device"] = self.device
        return out


# --------------------------------------------------------------------------- which weights

def quantizable_weights(config: dict[str, Any], spec: QuantSpec) -> dict[str, bool]:
    """Checkpoint keys transformers would quantize -> whether the weight is transposed (Conv1D).

    Raises:
        BadInputError: the architecture is unknown to transformers.
    """
    import transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    archs = cfg_dict.get("architectures") or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    try:
        cfg = transformers.AutoConfig.for_model(**cfg_dict)
        if model_cls is None:
            model_cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
        # a model class; transformers' lazy mapping is typed as a tuple of optional classes
        build = cast("Callable[[Any], Any]", model_cls)
        with torch.device("meta"):
            model = build(cfg)
    except (KeyError, ValueError, TypeError) as err:
        raise BadInputError(f"cannot build the model skeleton from config.json ({err})",
                            fix="quantize with transformers directly for this architecture") from None
    # transformers' get_modules_to_not_convert: the given skip list *replaces* the default
    # one (output embedding, tied weights); adding to it left lm_head in float while the
    # config said to quantize it, and the model could not run a forward pass
    skip = list(spec.skip_modules) or get_keys_to_not_convert(model)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out: dict[str, bool] = {}
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, skip):
            continue
        if type(module) is nn.Linear or isinstance(module, Conv1D):
            out[f"{name}.weight"] = isinstance(module, Conv1D)
    return out


# --------------------------------------------------------------------------- one tensor

def planned_outputs(name: str, shape: tuple[int, ...], spec: QuantSpec) -> list[OutTensor]:
    """The tensors one quantized weight ``name`` (``<m>.weight``) becomes, with sizes."""
    numel = math.prod(shape)
    module = name[: -len(".weight")]
    if not spec.four_bit:
        return [OutTensor(f"{module}.SCB", "F32", (shape[0],), 4 * shape[0]),
                OutTensor(name, "I8", tuple(shape), numel),
                OutTensor(f"{module}.weight_format", "U8", (), 1)]
    blocks = -(-numel // spec.blocksize)
    out = [OutTensor(f"{name}.quant_map", "F32", (16,), 64)]
    if spec.double_quant:
        nested = -(-blocks // 256)
        out += [OutTensor(f"{name}.nested_absmax", "F32", (nested,), 4 * nested),
                OutTensor(f"{name}.nested_quant_map", "F32", (256,), 1024),
                OutTensor(f"{name}.absmax", "U8", (blocks,), blocks)]
    else:
        out.append(OutTensor(f"{name}.absmax", "F32", (blocks,), 4 * blocks))
    packed = (numel + 1) // 2
    out += [OutTensor(name, "U8", (packed, 1), packed),
            OutTensor(f"{name}.quant_state.bitsandbytes__{spec.method}", "U8", None, _QS_JSON_MAX)]
    return out


def quantize_weight(name: str, weight: torch.Tensor, spec: QuantSpec, *, transposed: bool = False
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Quantize one weight; returns (tensors to write, dequantized weight).

    ``weight`` is in the model's dtype (what transformers quantizes); the tensors are
    ordered float32 first, the dequantized weight is float32 in the weight's shape.
    The conversion runs on ``spec.device``; everything returned is on the CPU.
    """
    functional = _bnb().functional
    w = (weight.T if transposed else weight).contiguous().to(spec.device)
    module = name[: -len(".weight")]
    if not spec.four_bit:
        cb, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16))
        deq = functional.int8_vectorwise_dequant(cb, scb).float()
        tensors = {f"{module}.SCB": scb.float().cpu().contiguous(), name: cb.cpu().contiguous(),
                   f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    else:
        packed, state = functional.quantize_4bit(w, blocksize=spec.blocksize,
                                                 compress_statistics=spec.double_quant,
                                                 quant_type=spec.method, quant_storage=torch.uint8)
        deq = functional.dequantize_4bit(packed, state).float()
        parts = {f"{name}.{k}": v.detach().cpu().clone().contiguous()
                 for k, v in state.as_dict(packed=True).items()}
        tensors = {k: parts[k] for k in sorted(parts, key=lambda k: parts[k].dtype != torch.float32)}
        tensors[name] = packed.cpu().contiguous()
        qs_key = f"{name}.quant_state.bitsandbytes__{spec.method}"
        tensors[qs_key] = tensors.pop(qs_key)
        if tensors[qs_key].numel() > _QS_JSON_MAX:  # pragma: no cover - bnb format change
            raise RuntimeError(f"{qs_key}: quant state larger than {_QS_JSON_MAX} bytes")
    deq = deq.cpu()
    return tensors, (deq.T if transposed else deq)


def roundtrip(weight: torch.Tensor, spec: QuantSpec, *, transposed: bool = False) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in the weight's dtype: what a QLoRA adapter saw."""
    _, deq = quantize_weight("w.weight", weight, spec, transposed=transposed)
    return deq.to(weight.dtype)


def relative_error(weight: torch.Tensor, deq: torch.Tensor, *, name: str = "weight",
                   method: str = "") -> tuple[float, float]:
    """``(||W - deq||_F^2, ||W||_F^2)`` (sum over modules for the overall error).

    Squares are summed in float32 with torch's cascade summation (``(x * x).sum()``):
    within ~1e-8 of float64 and 4x faster; ``vector_norm`` in float32 is faster still
    but ~1e-3 off on a 10M-element weight (measured).

    Raises:
        BadInputError: Either is not finite: a NaN or infinite weight, or one int8's
            float16 step makes infinite. The model would give NaN logits; the run used
            to succeed (and print a bare NaN in ``--json``).
    """
    w = weight.float()
    diff = w - deq.float()
    err_sq, w_sq = float((diff * diff).sum()), float((w * w).sum())
    if not (math.isfinite(err_sq) and math.isfinite(w_sq)):
        raise BadInputError(f"{name}: quantizing to {method or 'this format'} gives non-finite "
                            "weights (a NaN or infinite value, or one beyond float16's range "
                            "for int8)", fix="check the source weights (`adapters verify "
                            "--model`, or the merge that made them)")
    return err_sq, w_sq
