"""Source model directories for streamed rewrites: layout and reading.

merge-and-unload and requantization rewrite a whole model but may hold only a few
row ranges in memory:

* **Layout** (:func:`read_layout`): shard files and every tensor's offsets, from the
  strict header reader (:mod:`registry.formats.safetensors_header`); headers only.
* **Reading** (:class:`TensorReader`): ``preadv`` at the tensor's offset, in row
  ranges. ``safe_open`` would mmap the shard, and every page touched stays in the
  process's resident set until the file is closed (measured here: 800 MB peak RSS to
  stream a 512 MB shard with one ``safe_open``, 320 MB when reopening per tensor),
  which breaks the "peak memory ~ one module" budget on multi-GB shards. Writing is
  :mod:`merging.model.shard_writer`.

Output shards are planned by :mod:`merging.model.shard_plan`; the output directory
(staging, non-weight files) is :mod:`merging.model.output_dir`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from merging.dtypes import torch_dtype
from merging.model.buffers import byte_view, view_as
from registry.errors import BadInputError, NotFoundError, shorten
from registry.formats.safetensors_header import SafetensorsHeader, TensorInfo, read_header
from registry.formats.strict_json import loads_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
CHUNK_BYTES = 16 << 20
"""Largest piece read or written at once (row ranges of big tensors are this size)."""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ``None`` -> ``None``.

    Units follow transformers' ``max_shard_size`` (GB = 10**9, GiB = 2**30).

    Raises:
        BadInputError: not a positive size.
    """
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise BadInputError(f"size must be positive, got {text}", fix="use e.g. 2GB or 500MB")
        return text
    match = _SIZE_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise BadInputError(f"bad size {text!r}", fix="use e.g. 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.float()``, with a faster path for bfloat16: its bits shifted into the top
    half of an int32 in one numpy pass (~2x faster than torch's cast on CPU here)."""
    if tensor.dtype != torch.bfloat16:
        return tensor.float()
    import numpy as np

    bits = np.empty(tuple(tensor.shape), dtype=np.int32)
    np.left_shift(tensor.contiguous().view(torch.int16).numpy(), 16, out=bits, dtype=np.int32)
    return torch.from_numpy(bits).view(torch.float32)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)``, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its state after. The tasks
    allocate enough small objects to trigger a full collection, which walks every
    object torch and transformers made at import (~170k) holding the GIL while both
    workers wait: 53 ms of a 0.85 s unload on the 1B benchmark, 3% of its wall time.
    The rewrite makes no reference cycles worth collecting meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class SourceTensor:
    """Where one base tensor lives."""

    name: str
    file: Path
    info: TensorInfo
    data_offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.info.shape

    @property
    def dtype(self) -> str:
        """The safetensors dtype name (``BF16``...)."""
        return self.info.dtype


@dataclass(frozen=True)
class ModelLayout:
    """A model directory's weights: shard files in order and every tensor in file order."""

    model_dir: Path
    files: tuple[str, ...]
    tensors: dict[str, SourceTensor]
    indexed: bool
    headers: dict[str, SafetensorsHeader] = field(repr=False, default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.info.nbytes for t in self.tensors.values())

    def weight_files(self) -> set[str]:
        """Names of the files that belong to the weights (shards and index)."""
        return set(self.files) | ({INDEX_NAME} if self.indexed else set())


def read_layout(model_dir: str | Path) -> ModelLayout:
    """Read the shard layout of a transformers model directory (headers only).

    Raises:
        NotFoundError: the directory or a shard named by the index is missing.
        BadInputError: no safetensors weights, a malformed header or index, or a tensor
            the index names that its shard does not hold.
    """
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise BadInputError(f"{shorten(str(model_dir))} is a file, not a model directory",
                            fix="pass the directory that holds config.json and the weights")
    if not model_dir.is_dir():
        raise NotFoundError(f"{shorten(str(model_dir))}: no such model directory",
                            fix="check the model directory's path")
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = loads_json(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
            odd = [v for v in weight_map.values() if not isinstance(v, str)]
            if odd:
                raise TypeError(f"weight_map maps a tensor to {shorten(odd[0])}, not a shard file name")
        except (ValueError, KeyError, TypeError) as err:
            raise BadInputError(f"{index_path}: malformed index ({err})",
                                fix="re-save the model with save_pretrained") from None
        files = tuple(dict.fromkeys(weight_map.values()))
        indexed = True
    elif (model_dir / SINGLE_NAME).is_file():
        weight_map, files, indexed = None, (SINGLE_NAME,), False
    else:
        raise BadInputError(f"{model_dir}: no model.safetensors or {INDEX_NAME}",
                            fix="save the model with save_pretrained(safe_serialization=True)")
    tensors: dict[str, SourceTensor] = {}
    headers: dict[str, SafetensorsHeader] = {}
    for fname in files:
        if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise BadInputError(f"{index_path}: bad shard file name {shorten(fname)}",
                                fix="re-save the model with save_pretrained")
        header = read_header(model_dir / fname)
        headers[fname] = header
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            if weight_map is not None and weight_map.get(name) != fname:
                continue  # not claimed by the index for this file: transformers ignores it
            if name in tensors:
                raise BadInputError(f"{model_dir}: tensor {name!r} appears in two shards",
                                    fix="re-save the model with save_pretrained")
            tensors[name] = SourceTensor(name, model_dir / fname, info, header.data_offset)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise BadInputError(f"{index_path}: {missing[0]!r} is not in {weight_map[missing[0]]}",
                                fix="re-save the model with save_pretrained")
    return ModelLayout(model_dir, files, tensors, indexed, headers)


# --------------------------------------------------------------------------- reading

class TensorReader:
    """Reads base tensors (or row ranges of them) with ``preadv``: no mmap, and safe to
    call from several threads (no shared file position)."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def handle(self, path: Path) -> BinaryIO:
        """The open file (kept open until :meth:`close`)."""
        return self._fh(path)

    def _fh(self, path: Path) -> BinaryIO:
        with self._lock:
            fh = self._files.get(path)
            if fh is None:
                fh = self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
            return fh

    def read_bytes_into(self, src: SourceTensor, start: int, out: memoryview) -> None:
        """Fill ``out`` with the tensor's bytes from byte ``start`` (relative to the tensor).

        Raises:
            BadInputError: the file ended early (changed while reading).
        """
        fd = self._fh(src.file).fileno()
        offset = src.data_offset + src.info.start + start
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], offset + done)
            if not n:
                raise BadInputError(f"{src.file}: file changed while reading {src.name}",
                                    fix="make sure nothing writes the base model while unloading")
            done += n

    def read(self, src: SourceTensor, row_start: int = 0, row_end: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[row_start, row_end)`` of a tensor (the whole tensor by default), into
        ``buffer`` (a :class:`merging.model.buffers.BufferPool` buffer) when given."""
        shape = src.shape
        rows = shape[0] if shape else 1
        row_end = rows if row_end is None else row_end
        row_bytes = src.info.nbytes // max(rows, 1) if shape else src.info.nbytes
        if buffer is not None and buffer.numel() < (row_end - row_start) * row_bytes:
            buffer = None
        # allocated in the tensor's own dtype or viewed from float32 storage (a uint8
        # allocation viewed as float32 makes later matmuls several times slower)
        out = view_as(buffer, torch_dtype(src.dtype),
                      (row_end - row_start, *shape[1:]) if shape else ())
        if out.numel():
            self.read_bytes_into(src, row_start * row_bytes, byte_view(out))
        return out

    def close(self) -> None:
        """Close every file opened so far."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def row_chunks(shape: Sequence[int], itemsize: int, chunk_bytes: int = CHUNK_BYTES
               ) -> Iterator[tuple[int, int]]:
    """``(start, end)`` row ranges of about ``chunk_bytes`` each (one range for scalars)."""
    if not shape:
        yield 0, 1
        return
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
    if shape[0] == 0:
        yield 0, 0
