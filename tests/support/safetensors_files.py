"""The one hand-made safetensors writer of the suite, hostile framings included.

A safetensors file is ``N`` (8 bytes, little-endian), ``N`` bytes of JSON header, then
the tensors' bytes. Tests write such files by hand for two reasons: registry tests
must not need torch or numpy (an adapter in milliseconds, from plain floats), and
the header-parser and fuzz tests must write what no library would (a wrong ``N``, a
header that is not JSON, offsets that overlap). Both go through this module:

* :func:`safetensors_bytes` lays out a well-formed file from ``{name: (dtype, shape,
  data)}`` in the order given, with optional ``__metadata__`` first, a compact header
  and the space padding to a multiple of 8 that the safetensors library writes;
* :func:`raw_safetensors` frames any header (bytes verbatim, or a dict dumped as is)
  and any data, with an optional lying ``length``: the hostile inputs;
* :func:`write_safetensors` writes either to a path; :func:`f32` packs floats.

Files written through the safetensors library itself (``save_file`` of real torch or
numpy tensors) stay with the library: those tests check what real tools write.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RawTensor = tuple[str, Sequence[int], bytes]
"""``(dtype, shape, data)``: a tensor as the file holds it (``"F32"``, ``[2, 3]``, 24 bytes)."""


def f32(values: Sequence[float]) -> bytes:
    """``values`` as little-endian float32 bytes (the data of an ``F32`` tensor)."""
    return struct.pack(f"<{len(values)}f", *values)


def raw_safetensors(header: bytes | Mapping[str, Any], data: bytes = b"", *,
                    length: int | None = None) -> bytes:
    """A file framed by hand: ``N``, the header as given, ``data``; nothing checked.

    Args:
        header: Header bytes, verbatim (not JSON, duplicate keys, ``NaN``...), or an
            object dumped with ``json.dumps`` defaults (no padding).
        data: The bytes after the header.
        length: The ``N`` field, when it should lie about the header's length.

    Raises:
        TypeError: ``header`` is an object JSON cannot encode.
        struct.error: ``length`` does not fit 8 unsigned bytes.
    """
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def safetensors_bytes(tensors: Mapping[str, RawTensor],
                      metadata: Mapping[str, str] | None = None, *, pad: bool = True) -> bytes:
    """A well-formed file: ``tensors`` in the given order, data back to back.

    Args:
        tensors: ``{name: (dtype, shape, data)}``; offsets are computed from the data.
        metadata: The ``__metadata__`` object (first in the header), or none.
        pad: Pad the header with spaces to a multiple of 8 bytes, as the library does.

    Raises:
        TypeError: ``metadata`` or a shape JSON cannot encode.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return raw_safetensors(raw, b"".join(data for _, _, data in tensors.values()))


def write_safetensors(path: Path, content: bytes | Mapping[str, RawTensor],
                      metadata: Mapping[str, str] | None = None, *, pad: bool = True) -> Path:
    """Write a file's bytes, or :func:`safetensors_bytes` of tensors, to ``path``.

    Args:
        path: The file; its parent directories are created.
        content: Finished bytes (from :func:`raw_safetensors`...), or tensors.
        metadata: With tensors: see :func:`safetensors_bytes`.
        pad: With tensors: see :func:`safetensors_bytes`.

    Returns:
        ``path``.

    Raises:
        TypeError: ``metadata`` given with finished bytes (it would be dropped).
        OSError: The file cannot be written.
    """
    if isinstance(content, bytes):
        if metadata is not None:
            raise TypeError("metadata applies to tensors, not to finished bytes")
        data = content
    else:
        data = safetensors_bytes(content, metadata, pad=pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
