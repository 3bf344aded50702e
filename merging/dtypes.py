"""Safetensors dtype names <-> torch dtypes: the one table both halves of ``merging`` use.

The LoRA engine (:mod:`merging.lora.engine`: the output dtype of a merge) and the model
pipeline (:mod:`merging.model`: reading, merging and writing shards) both turn a
header's dtype string into a torch dtype; one table keeps them from disagreeing (the
engine's copy used to raise ``KeyError`` where the pipeline's named the dtype).
"""

from __future__ import annotations

import torch

from registry.errors import BadInputError

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """Safetensors dtype name -> torch dtype (``"BF16"`` -> ``torch.bfloat16``).

    Raises:
        BadInputError: a dtype torch cannot hold here (F4, F6...).
    """
    try:
        return ST_TO_TORCH[st_dtype]
    except KeyError:
        raise BadInputError(f"tensor dtype {st_dtype} is not supported for rewriting",
                            fix="convert the model to float16/bfloat16/float32 first") from None
