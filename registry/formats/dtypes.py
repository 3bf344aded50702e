"""The tensor dtypes safetensors knows, and their sizes: what byte counts are checked against.

A header's ``data_offsets`` must span exactly ``prod(shape) * bits / 8`` bytes, so the
bit width of every dtype is the one fact the header validator, the fingerprint and the
merge's shape checks share; a dtype missing here is refused as unknown rather than
guessed.
"""

from __future__ import annotations

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Every dtype safetensors 0.8 knows, with its size in bits."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Dtypes a LoRA weight may have."""
