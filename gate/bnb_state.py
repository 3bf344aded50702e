"""Reading bitsandbytes checkpoints back for the structural check: layout and sanity.

A quantized model directory (``adapters quantize``, or transformers' own
``save_pretrained`` of a bitsandbytes model) stores each converted ``nn.Linear``
weight ``<m>.weight`` with a documented set of companion tensors
(:mod:`merging.model.quantize` describes the serialization):

* **4-bit** (nf4/fp4): ``<m>.weight`` packed ``uint8`` of ``ceil(numel/2)`` bytes,
  ``<m>.weight.absmax`` (one scale per block; ``uint8`` when double-quantized),
  ``<m>.weight.quant_map`` (16 floats), with double quantization
  ``<m>.weight.nested_absmax`` and ``<m>.weight.nested_quant_map`` (256 floats), and
  ``<m>.weight.quant_state.bitsandbytes__<nf4|fp4>``: JSON bytes holding
  ``quant_type``, ``blocksize``, ``dtype``, the logical ``shape`` (and
  ``nested_blocksize``/``nested_dtype``/``nested_offset``);
* **int8** (LLM.int8, row-wise): ``<m>.weight`` ``int8`` in the logical shape,
  ``<m>.SCB`` (float32 row scales) and ``<m>.weight_format`` (``uint8`` 0).

:func:`read_layout` maps every tensor of a directory to its role: the *logical*
tensors (name -> shape, quantized weights with the shape of the weight they stand
for) that must match the base, and the companion tensors, each owned by one
quantized weight. Anything else is for the caller to call unexpected.

:func:`check_quantized` then checks each quantized weight: the JSON quant state is
well-formed (a known quant type, a supported block size, a float dtype, a 2-D shape;
parsed with :mod:`json`, never handed to ``getattr`` unchecked), every scale and
code book is finite and has the length the shape and block size imply, and the
weight **dequantized with bitsandbytes' own functions** (``QuantState.from_dict`` +
``dequantize_4bit``, ``int8_vectorwise_dequant``; all run on CPU) is finite. One
weight is in memory at a time. bitsandbytes is imported only when a directory
actually holds quantized weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from registry.formats.strict_json import loads_json

FOUR_BIT = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
STATE_KEY = re.compile(r"^(?P<weight>.+\.weight)\.quant_state\.bitsandbytes__(?P<kind>nf4|fp4)\Z")
FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_PARTS = ("SCB", "weight_format")
MAX_SHOWN = 3


@dataclass
class QuantLayout:
    """Roles of a directory's tensors (see module docstring).

    Attributes:
        logical: Tensor name -> the shape it stands for (a 4-bit weight: the shape in
            its quant state, None when that state is malformed; else the stored shape).
        four_bit: 4-bit weight name -> its quant type (from the state key).
        int8: int8 weight names.
        companions: Companion tensor name -> the weight it belongs to.
        problems: Malformed quant states found while reading the layout.
    """

    logical: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    four_bit: dict[str, str] = field(default_factory=dict)
    int8: set[str] = field(default_factory=set)
    companions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        """Whether any weight is quantized."""
        return bool(self.four_bit or self.int8)


def _short(value: Any, width: int = 20) -> str:
    """A bounded repr of an untrusted value."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _state_json(raw: Any, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse and validate a packed quant-state tensor: (state, problem)."""
    try:
        state = loads_json(bytes(raw.flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, f"{key}: quant state is not JSON"
    if not isinstance(state, dict):
        return None, f"{key}: quant state is not a JSON object"
    shape = state.get("shape")
    problems = []
    if state.get("quant_type") not in FOUR_BIT:
        problems.append(f"quant_type {_short(state.get('quant_type'))}")
    if state.get("blocksize") not in BLOCKSIZES:
        problems.append(f"blocksize {_short(state.get('blocksize'))}")
    if state.get("dtype") not in FLOAT_DTYPES:
        problems.append(f"dtype {_short(state.get('dtype'))}")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        problems.append(f"shape {_short(shape, 40)}")
    if "nested_blocksize" in state or "nested_offset" in state:
        offset = state.get("nested_offset")
        if state.get("nested_blocksize") not in BLOCKSIZES:
            problems.append(f"nested_blocksize {_short(state.get('nested_blocksize'))}")
        if state.get("nested_dtype") not in FLOAT_DTYPES:
            problems.append(f"nested_dtype {_short(state.get('nested_dtype'))}")
        if (isinstance(offset, bool) or not isinstance(offset, (int, float))
                or not math.isfinite(offset)):
            problems.append(f"nested_offset {_short(offset)}")
    if problems:
        return None, f"{key}: malformed quant state ({', '.join(problems)})"
    return state, None


def read_layout(model_dir: Path) -> QuantLayout:
    """The roles of every tensor in ``model_dir`` (headers plus the small quant states).

    Raises:
        BadInputError: No readable safetensors weights (:func:`registry.formats.fingerprint.model_weights`).
        NotFoundError: The directory or a shard is missing.
    """
    from safetensors import safe_open

    from registry.formats.fingerprint import model_weights

    found = model_weights(model_dir)
    stored = {name: found.files[path].tensors[name].shape for name, path in found.locations.items()}
    out = QuantLayout()
    for name, path in sorted(found.locations.items()):
        match = STATE_KEY.match(name)
        if not match or match["weight"] not in stored:
            continue
        weight = match["weight"]
        out.four_bit[weight] = match["kind"]
        out.companions[name] = weight
        for part in FOUR_BIT_PARTS:
            if f"{weight}.{part}" in stored:
                out.companions[f"{weight}.{part}"] = weight
        with safe_open(str(path), framework="pt") as handle:
            state, problem = _state_json(handle.get_tensor(name), name)
        if problem:
            out.problems.append(problem)
        out.logical[weight] = tuple(state["shape"]) if state else None  # shape unknown
    for name in stored:
        if name.endswith(".SCB"):
            weight = name[: -len("SCB")] + "weight"
            if weight in stored and weight not in out.four_bit:
                out.int8.add(weight)
                out.companions[name] = weight
                fmt = name[: -len("SCB")] + "weight_format"
                if fmt in stored:
                    out.companions[fmt] = weight
    for name, shape in stored.items():
        if name not in out.companions and name not in out.logical:
            out.logical[name] = shape
    return out


def _finite(tensor: Any) -> bool:
    import torch

    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _four_bit_problems(weight: str, parts: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """Lengths and finiteness of one 4-bit weight's tensors (before dequantizing)."""
    numel = math.prod(state["shape"])
    blocks = -(-numel // state["blocksize"])
    problems = []
    packed = parts.get("weight")
    if packed is None or packed.numel() != (numel + 1) // 2:
        problems.append(f"{weight}: packed weight holds {None if packed is None else packed.numel()} "
                        f"bytes, {(numel + 1) // 2} expected for shape {state['shape']}")
    expect = {"absmax": blocks, "quant_map": 16}
    nested = "nested_absmax" in parts or "nested_blocksize" in state
    if nested:
        expect.update(nested_absmax=-(-blocks // state.get("nested_blocksize", 256)),
                      nested_quant_map=256)
    for part, length in expect.items():
        tensor = parts.get(part)
        if tensor is None:
            problems.append(f"{weight}.{part} is missing")
        elif tensor.numel() != length:
            problems.append(f"{weight}.{part} has {tensor.numel()} values, {length} expected")
        elif not _finite(tensor):
            problems.append(f"{weight}.{part} holds NaN/inf")
    if not nested and "absmax" in parts and parts["absmax"].is_floating_point() is False:
        problems.append(f"{weight}.absmax is {parts['absmax'].dtype} without double quantization")
    return problems


def _dequantize_4bit(parts: dict[str, Any], state: dict[str, Any], kind: str) -> Any:
    import torch
    from bitsandbytes import functional

    packed_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    qs_dict = {k: v for k, v in parts.items() if k in FOUR_BIT_PARTS}
    qs_dict[f"quant_state.bitsandbytes__{kind}"] = packed_state
    quant_state = functional.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    return functional.dequantize_4bit(parts["weight"], quant_state)


def _int8_problems(weight: str, parts: dict[str, Any]) -> tuple[list[str], Any]:
    """(problems, dequantized weight or None) of one int8 weight."""
    import torch

    cb, scb, fmt = parts["weight"], parts["SCB"], parts.get("weight_format")
    problems = []
    if cb.dtype != torch.int8 or cb.dim() != 2:
        return [f"{weight}: int8 weight expected (2-D int8 with an SCB)"], None
    if scb.dim() != 1 or scb.numel() != cb.shape[0]:
        problems.append(f"{weight[:-len('weight')]}SCB has {scb.numel()} row scales, "
                        f"{cb.shape[0]} expected")
    elif not _finite(scb) or bool((scb < 0).any()):
        problems.append(f"{weight[:-len('weight')]}SCB holds NaN/inf or negative scales")
    if fmt is not None and (fmt.numel() != 1 or int(fmt.flatten()[0]) != 0):
        problems.append(f"{weight[:-len('weight')]}weight_format is not 0 (row-major)")
    if problems:
        return problems, None
    from bitsandbytes import functional

    return [], functional.int8_vectorwise_dequant(cb, scb.float())


def check_quantized(model_dir: Path, layout: QuantLayout) -> tuple[int, list[str]]:
    """Check every quantized weight of ``model_dir``; returns (weights checked, problems).

    Raises:
        BadInputError: Unreadable safetensors files.
    """
    import torch
    from safetensors import safe_open

    from registry.formats.fingerprint import model_weights

    if not layout.quantized:
        return 0, []
    found = model_weights(model_dir)
    handles: dict[Path, Any] = {}
    problems: list[str] = []

    def tensor(name: str) -> Any:
        path = found.locations[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for weight, kind in sorted(layout.four_bit.items()):
        parts = {"weight": tensor(weight)}
        parts.update({part: tensor(f"{weight}.{part}") for part in FOUR_BIT_PARTS
                      if f"{weight}.{part}" in found.locations})
        key = f"{weight}.quant_state.bitsandbytes__{kind}"
        state, problem = _state_json(tensor(key), key)
        if state is None:  # then ``problem`` says why
            problems.append(str(problem))
            continue
        found_problems = _four_bit_problems(weight, parts, state)
        if not found_problems:
            deq = _dequantize_4bit(parts, state, kind)
            if not bool(torch.isfinite(deq).all()):
                found_problems.append(f"{weight}: dequantized weight holds NaN/inf")
        problems += found_problems
    for weight in sorted(layout.int8):
        module = weight[: -len("weight")]
        parts = {"weight": tensor(weight), "SCB": tensor(f"{module}SCB")}
        if f"{module}weight_format" in found.locations:
            parts["weight_format"] = tensor(f"{module}weight_format")
        found_problems, deq = _int8_problems(weight, parts)
        if deq is not None and not bool(torch.isfinite(deq).all()):
            found_problems.append(f"{weight}: dequantized weight holds NaN/inf")
        problems += found_problems
    return len(layout.four_bit) + len(layout.int8), problems
