"""A strict, pure-Python reader for safetensors headers.

Why not ``safetensors.safe_open``? The registry must inspect untrusted files
(adapters pushed by anyone, base models downloaded from anywhere) without
importing torch and without ever trusting a length, an offset or a shape it has
not checked. This module reads only the header and validates it completely, so
every malformed input ends in one :class:`~registry.errors.BadInputError` with a
one-line message naming the file and the problem, never in another exception,
a huge allocation or a hang.

File format (https://github.com/huggingface/safetensors): 8 bytes little-endian
``N``, then ``N`` bytes of UTF-8 JSON, then the data region. The JSON is an
object mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` (offsets relative to the data region) plus an optional
``"__metadata__"`` object of string to string.

Checks, in order (each failure is a ``BadInputError``):

* the path is a regular file of at least 8 bytes;
* ``N`` is at most :data:`MAX_HEADER_BYTES` (the spec's 100 MB) and fits in the file;
* the header starts with ``{``, has at most ``max_tensors`` (default
  :data:`MAX_TENSORS`) ``{`` and at most :data:`ITEMS_PER_TENSOR` /
  :data:`PAIRS_PER_TENSOR` times as many ``,`` / ``:`` (byte counts taken *before*
  decoding, so a JSON bomb is refused without building it: the parsed tree of an
  accepted header stays within about ten times its size), and is UTF-8; nesting is
  refused by the parser's recursion guard and by the fixed schema;
* the JSON is an object, with no duplicate keys (two parsers must never disagree on
  which tensor a name means), no floats, ``NaN``/``Infinity``, negative or overlong
  integers;
* names are non-empty, encodable as UTF-8 (no lone surrogates) and free of control
  characters; each entry has exactly the fields ``dtype``, ``shape``, ``data_offsets``;
* the dtype is known; the shape is a list of non-negative ints whose running product
  stays below 2**64 (as the Rust reader checks); the byte size ``prod(shape) * bits / 8``
  is whole and equals ``end - begin``;
* sorted by offset, the tensors tile the data region exactly: the first starts at 0,
  each starts where the previous ended (no gap, no overlap) and the last ends at the
  end of the file.

This is stricter than the reference reader (which ignores unknown fields, keeps the
last of duplicate keys and accepts leading whitespace) but never looser: every header
accepted here is accepted by ``safetensors`` with the same names, dtypes and shapes
(``tests/unit/test_ingest_fuzz.py`` checks this differentially).

:func:`memoized_headers` lets one operation parse each file once.
:func:`registry.formats.fingerprint.iter_tensor_chunks` streams one tensor's bytes in bounded
chunks, so that fingerprints of multi-GB models never load a whole file.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from registry.errors import BadInputError, EnvironmentFailure, NotFoundError
from registry.formats.dtypes import DTYPE_BITS
from registry.formats.strict_json import StrictJSONError, loads_strict, show_name

MAX_HEADER_BYTES = 100_000_000
"""Largest header accepted (the limit of the reference implementation)."""

MAX_TENSORS = 100_000
"""Default cap on the number of tensors in one file (real shards hold thousands)."""

ITEMS_PER_TENSOR = 16
"""Cap on ``,`` separators per allowed tensor: bounds the parsed size of a JSON bomb."""

PAIRS_PER_TENSOR = 5
"""Cap on ``:`` separators per allowed tensor (an entry has 4): bounds ``__metadata__``."""

MAX_INT_DIGITS = 20
"""Integers in a header are u64: at most 20 decimal digits."""

U64_MAX = 2**64 - 1

CHUNK_BYTES = 1 << 20

_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_INT_ONLY = frozenset({int})  # exact type: bool (a subclass of int) is refused
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_MEMO: ContextVar[dict[tuple[int, ...], SafetensorsHeader] | None] = ContextVar(
    "safetensors_header_memo", default=None)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: ``start``/``end`` are offsets into the data region."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (``prod(shape)``)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header; ``data_offset`` is where the data region starts in the file."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_offset: int
    file_size: int


class _Bad(Exception):
    """Internal: a validation failure, turned into BadInputError with the file name."""


def _bad(path: Path, problem: str) -> BadInputError:
    return BadInputError(
        f"{path}: not a valid safetensors file: {problem}",
        fix="re-save the weights with safetensors (save_file / save_pretrained) and retry",
    )


def _parse_int(text: str) -> int:
    if text.startswith("-"):
        raise _Bad(f"negative integer {text[:24]}")
    if len(text) > MAX_INT_DIGITS:
        raise _Bad("integer too large")
    value = int(text)
    if value > U64_MAX:
        raise _Bad("integer too large")
    return value


def _parse_float(text: str) -> Any:
    raise _Bad(f"unexpected number {text[:24]} (integers only)")








def _check_name(name: str) -> None:
    if not name:
        raise _Bad("empty tensor name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(f"tensor name {show_name(name)} is not valid UTF-8") from None
    if _CONTROL.search(name):
        raise _Bad(f"tensor name {show_name(name)} contains control characters")


class _Shown:
    """Formats a name for a message only when the message is built."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return show_name(self.name)


def _tensor_info(name: str, entry: Any, data_len: int) -> TensorInfo:
    shown = _Shown(name)
    if not isinstance(entry, dict):
        raise _Bad(f"entry of tensor {shown} is not an object")
    if set(entry) != _FIELDS:
        extra = sorted(set(entry) - _FIELDS)
        missing = sorted(_FIELDS - set(entry))
        what = f"unknown field {show_name(extra[0])}" if extra else f"missing field {missing[0]!r}"
        raise _Bad(f"tensor {shown}: {what}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown_dtype = show_name(dtype) if isinstance(dtype, str) else type(dtype).__name__
        raise _Bad(f"tensor {shown}: unknown dtype {shown_dtype}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not set(map(type, shape)) <= _INT_ONLY:
        raise _Bad(f"tensor {shown}: shape is not a list of non-negative integers")
    numel = 1
    for dim in shape:  # the Rust reader's checked_mul fold, left to right
        numel *= dim
        if numel > U64_MAX:
            raise _Bad(f"tensor {shown}: shape {_short(shape)} overflows")
    nbits = numel * DTYPE_BITS[dtype]
    if nbits > U64_MAX:
        raise _Bad(f"tensor {shown}: shape {_short(shape)} overflows")
    if nbits % 8:
        raise _Bad(f"tensor {shown}: {dtype} shape {_short(shape)} is not a whole number of bytes")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not set(map(type, offsets)) <= _INT_ONLY
    ):
        raise _Bad(f"tensor {shown}: data_offsets is not a pair of integers")
    start, end = offsets
    if end < start or end > data_len:
        raise _Bad(
            f"tensor {shown}: data_offsets [{start}, {end}] out of range "
            f"(data region is {data_len} bytes)"
        )
    if end - start != nbits // 8:
        raise _Bad(
            f"tensor {shown}: {end - start} bytes for {dtype} shape {_short(shape)} "
            f"(needs {nbits // 8})"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _short(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else text[:57] + "...]"


def _check_tiling(tensors: dict[str, TensorInfo], data_len: int) -> None:
    position = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != position:
            problem = "overlaps the previous tensor" if info.start < position else "leaves a gap"
            raise _Bad(f"tensor {show_name(name)}: data_offsets [{info.start}, {info.end}] {problem}")
        position = info.end
    if position != data_len:
        raise _Bad(
            f"tensors cover {position} bytes but the data region holds {data_len} "
            "(truncated file or trailing bytes)"
        )


def parse_header_bytes(
    raw: bytes, data_len: int, *, max_tensors: int = MAX_TENSORS
) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Validate header JSON bytes against a data region of ``data_len`` bytes.

    Args:
        raw: The ``N`` header bytes (after the 8-byte length).
        data_len: Size of the data region that follows the header.
        max_tensors: Refuse headers with more tensors than this.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        _Bad: internal; :func:`read_header` turns it into ``BadInputError``.
    """
    if not raw.startswith(b"{"):
        raise _Bad("header does not start with '{'")
    # Cheap bounds before building anything: each tensor entry opens one object.
    if raw.count(b"{") > max_tensors + 2:
        raise _Bad(f"header has more than {max_tensors} entries")
    if (
        raw.count(b",") > ITEMS_PER_TENSOR * max_tensors + 4096
        or raw.count(b":") > PAIRS_PER_TENSOR * max_tensors + 4096
    ):
        raise _Bad("header has too many JSON items")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"header is not UTF-8 (byte {exc.start})") from None
    try:
        obj = loads_strict(text, parse_int=_parse_int, parse_float=_parse_float)
    except _Bad:
        raise
    except StrictJSONError as exc:
        raise _Bad(str(exc)) from None
    except RecursionError:
        raise _Bad("header JSON is nested too deeply") from None
    except (ValueError, MemoryError) as exc:  # JSONDecodeError is a ValueError
        raise _Bad(f"header is not JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise _Bad("header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise _Bad("__metadata__ is not an object of strings")
        for key, value in metadata.items():
            try:
                key.encode("utf-8")
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Bad("__metadata__ is not valid UTF-8") from None
    if len(obj) > max_tensors:
        raise _Bad(f"header has more than {max_tensors} tensors")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        _check_name(name)
        tensors[name] = _tensor_info(name, entry, data_len)
    _check_tiling(tensors, data_len)
    return tensors, metadata


def read_header(path: str | Path, *, max_tensors: int = MAX_TENSORS) -> SafetensorsHeader:
    """Read and fully validate the header of a safetensors file.

    Only the 8-byte length and the header are read; the data region is checked
    against the offsets through the file size, never loaded.

    Args:
        path: The ``.safetensors`` file.
        max_tensors: Refuse files with more tensors than this (bounds memory).

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        NotFoundError: ``path`` does not exist.
        EnvironmentFailure: ``path`` may not be read (permission denied).
        BadInputError: anything about the file is malformed (message names the file).
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        with os.fdopen(os.open(path, _OPEN_FLAGS), "rb") as fh:
            return _read_open(path, fh, max_tensors)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file", fix="check the path") from None
    except IsADirectoryError:
        raise _bad(path, "is a directory") from None
    except PermissionError:  # the README's exit table: permission denied is environment
        raise EnvironmentFailure(f"{path}: permission denied", fix="make the file readable") from None
    except OSError as exc:  # a socket or device node where a file should be
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})",
                            fix="replace it with a regular safetensors file") from None


@contextlib.contextmanager
def memoized_headers() -> Iterator[None]:
    """Within this block (on this thread), :func:`read_header` parses each file once: a
    rewrite reads the same base and adapter headers from several places (layout,
    fingerprint, shape checks), 12 parses and ~15 ms for a 3-shard model. A file is the
    same file while its device, inode, size, mtime and ctime are; anything else is
    parsed again. Nested blocks share the outer one's memo."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _read_open(path: Path, fh: BinaryIO, max_tensors: int) -> SafetensorsHeader:
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "not a regular file")
    memo = _MEMO.get()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, max_tensors)
    if memo is not None and key in memo:
        return memo[key]
    header = _parse_open(path, fh, st.st_size, max_tensors)
    if memo is not None:
        memo[key] = header
    return header


def _parse_open(path: Path, fh: BinaryIO, size: int, max_tensors: int) -> SafetensorsHeader:
    if size < 8:
        raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise _bad(path, f"header length {n} exceeds the file size {size}")
    raw = fh.read(n)
    if len(raw) != n:
        raise _bad(path, "file shrank while reading the header")
    data_len = size - 8 - n
    try:
        tensors, metadata = parse_header_bytes(raw, data_len, max_tensors=max_tensors)
    except _Bad as exc:
        raise _bad(path, str(exc)) from None
    return SafetensorsHeader(
        tensors=tensors, metadata=metadata, data_offset=8 + n, file_size=size
    )
