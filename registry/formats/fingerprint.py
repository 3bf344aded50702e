"""Base-model fingerprints: which base an adapter was trained on, checked cheaply.

A fingerprint has two digests, both ``"sha256:<hex>"`` and both independent of how
the weights are split into files (one ``model.safetensors`` or any sharding listed in
``model.safetensors.index.json``), of tensor order within files and of metadata:

``struct_digest``
    sha256 of the canonical JSON of ``{"v": 1, "tensors": [[name, shape], ...]
    sorted by name, "config": {...}}`` where ``config`` holds the architecture
    fields of ``config.json`` (:data:`ARCH_FIELDS`, only those present, and the same
    fields of a nested ``text_config``), or ``null`` without a ``config.json``.
    Read from headers only: milliseconds for any model size. Equal structures
    accept the same adapters; dtype is deliberately left out (a bf16 and an f32
    copy of one model share it).
``weights_digest``
    sha256 of the canonical JSON of ``{"v": 1, "tensors": [[name, dtype, shape,
    sha256-hex of the tensor's bytes], ...] sorted by name}``: streams every byte
    once, in bounded chunks, reporting progress in bytes.

Canonical JSON is :func:`registry.digests.canonical_json`, as everywhere in the registry.

Sharded directories are validated: the index is a JSON object whose
``weight_map`` maps every tensor to a shard that is a plain file name in the
directory, every mapped tensor is in its shard, and every tensor of a listed
shard is mapped to that shard (no tensor is stored twice). Symlinked files are
followed (a Hugging Face cache snapshot links into ``../../blobs``): fingerprinting
only reads them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from registry.digests import json_digest
from registry.errors import BadInputError, NotFoundError
from registry.formats.safetensors_header import (
    CHUNK_BYTES,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)
from registry.formats.strict_json import load_json_file
from registry.progress import ProgressCallback

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
ARCH_FIELDS: tuple[str, ...] = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
"""config.json fields that enter ``struct_digest``."""

_SHARD_NAME = re.compile(r"^[^/\\\x00]+\Z")


@dataclass(frozen=True)
class BaseFingerprint:
    """Digests identifying a base model (see module docstring)."""

    struct_digest: str
    weights_digest: str | None

    def to_json(self) -> dict[str, str | None]:
        """``{"struct_digest": ..., "weights_digest": ...}``."""
        return {"struct_digest": self.struct_digest, "weights_digest": self.weights_digest}


@dataclass(frozen=True)
class ModelWeights:
    """The validated safetensors files of a model directory."""

    files: dict[Path, SafetensorsHeader]
    """Each weight file and its header, in name order."""
    locations: dict[str, Path]
    """Tensor name -> the file holding it."""

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (what hashing the weights reads)."""
        return sum(self.files[path].tensors[name].nbytes for name, path in self.locations.items())




def _model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise NotFoundError(
            f"model directory {path} does not exist", fix="pass a local model directory"
        )
    if not path.is_dir():
        raise BadInputError(
            f"{path} is not a directory",
            fix="pass the directory holding config.json and model.safetensors",
        )
    return path


def model_weights(model_dir: str | Path) -> ModelWeights:
    """Find, read and cross-check the safetensors files of a model directory.

    Args:
        model_dir: Directory with ``model.safetensors`` or
            ``model.safetensors.index.json`` plus its shards.

    Returns:
        The validated :class:`ModelWeights`.

    Raises:
        NotFoundError: the directory or a listed shard does not exist.
        BadInputError: no safetensors weights, malformed index or headers, or the
            index and the shards disagree.
    """
    root = _model_dir(model_dir)
    index_path = root / INDEX_FILE
    single = root / SINGLE_FILE
    if index_path.exists():
        return _sharded(root, index_path)
    if single.exists():
        header = read_header(single)
        return ModelWeights(files={single: header}, locations=dict.fromkeys(header.tensors, single))
    hint = (
        "convert it: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        if any(root.glob("*.bin")) or any(root.glob("*.pt"))
        else "pass a directory with model.safetensors or model.safetensors.index.json"
    )
    raise BadInputError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} found", fix=hint)


def _sharded(root: Path, index_path: Path) -> ModelWeights:
    index = load_json_file(index_path, "the shard index")
    fix = f"regenerate {INDEX_FILE} (save_pretrained writes it)"
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{index_path}: no weight_map object", fix=fix)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _SHARD_NAME.match(shard) or shard in (".", ".."):
            raise BadInputError(
                f"{index_path}: tensor {name[:120]!r} maps to an invalid shard name "
                f"{str(shard)[:80]!r}",
                fix=fix,
            )
        by_shard.setdefault(shard, []).append(name)
    files: dict[Path, SafetensorsHeader] = {}
    locations: dict[str, Path] = {}
    for shard in sorted(by_shard):
        path = root / shard
        if not path.exists():
            raise NotFoundError(f"{index_path}: shard {shard!r} is missing", fix=fix)
        header = read_header(path)
        files[path] = header
        expected = set(by_shard[shard])
        missing = sorted(expected - header.tensors.keys())
        if missing:
            raise BadInputError(
                f"{index_path}: tensor {missing[0][:120]!r} is not in its shard {shard!r}", fix=fix
            )
        unlisted = sorted(header.tensors.keys() - expected)
        if unlisted:
            raise BadInputError(
                f"{path}: tensor {unlisted[0][:120]!r} is not mapped to this shard by the index",
                fix=fix,
            )
        for name in header.tensors:
            locations[name] = path
    return ModelWeights(files=files, locations=locations)


def model_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a model directory, from headers only.

    Raises:
        NotFoundError: as :func:`model_weights`.
        BadInputError: as :func:`model_weights`.
    """
    weights = model_weights(model_dir)
    return {
        name: weights.files[path].tensors[name].shape
        for name, path in sorted(weights.locations.items())
    }


def model_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a model directory, or None when absent.

    Raises:
        BadInputError: the file exists but is not a JSON object.
    """
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return None
    config = load_json_file(path, "config.json")
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: config.json is not a JSON object", fix="repair config.json")
    return config


def arch_fields(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The :data:`ARCH_FIELDS` present in a config (and in its ``text_config``)."""
    if config is None:
        return None
    out = {key: config[key] for key in ARCH_FIELDS if key in config}
    text = config.get("text_config")
    if isinstance(text, dict):
        nested = {key: text[key] for key in ARCH_FIELDS if key in text}
        if nested:
            out["text_config"] = nested
    return out


def fingerprint_model(
    model_dir: str | Path, *, weights: bool = True, progress: ProgressCallback | None = None
) -> BaseFingerprint:
    """Fingerprint a local model directory (single-file or sharded safetensors).

    Args:
        model_dir: The model directory.
        weights: Also compute ``weights_digest`` (reads every byte); when False only
            headers are read and ``weights_digest`` is None.
        progress: Called with the number of bytes just hashed (total:
            ``model_weights(model_dir).total_bytes``).

    Returns:
        The :class:`BaseFingerprint`.

    Raises:
        NotFoundError: the directory or a shard is missing.
        BadInputError: no safetensors weights, malformed files, or inconsistent index.
    """
    found = model_weights(model_dir)
    config = model_config(model_dir)
    names = sorted(found.locations)

    def info(name: str) -> TensorInfo:
        return found.files[found.locations[name]].tensors[name]

    struct = {
        "v": 1,
        "tensors": [[name, list(info(name).shape)] for name in names],
        "config": arch_fields(config),
    }
    struct_digest = json_digest(struct)
    if not weights:
        return BaseFingerprint(struct_digest=struct_digest, weights_digest=None)
    hashes: dict[str, str] = {}
    for path, header in found.files.items():
        hashes.update(hash_tensors(path, header, progress=progress))
    entries = [
        [name, info(name).dtype, list(info(name).shape), hashes[name]] for name in names
    ]
    return BaseFingerprint(
        struct_digest=struct_digest, weights_digest=json_digest({"v": 1, "tensors": entries})
    )


def hash_tensors(
    path: str | Path,
    header: SafetensorsHeader | None = None,
    *,
    progress: ProgressCallback | None = None,
    chunk_size: int = CHUNK_BYTES,
) -> dict[str, str]:
    """sha256 (hex) of each tensor's bytes, streamed in file order.

    Args:
        path: A safetensors file.
        header: Its header, if already read (read and validated otherwise).
        progress: Called with the number of bytes just hashed.
        chunk_size: Read size.

    Returns:
        ``{tensor name: hex sha256 of its bytes}``.

    Raises:
        BadInputError: malformed file, or it changed size since ``header`` was read.
        NotFoundError: the file is missing.
    """
    path = Path(path)
    if header is None:
        header = read_header(path)
    digests: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size != header.file_size:
                raise BadInputError(
                    f"{path}: file changed size since its header was read",
                    fix="make sure nothing writes the file while adapterkit reads it",
                )
            for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
                h = hashlib.sha256()
                for chunk in iter_tensor_chunks(fh, header, info, chunk_size=chunk_size):
                    h.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
                digests[name] = h.hexdigest()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file", fix="check the path") from None
    return digests


def iter_tensor_chunks(
    fh: BinaryIO, header: SafetensorsHeader, info: TensorInfo, *, chunk_size: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Yield one tensor's bytes from an open file in chunks of at most ``chunk_size``.

    Args:
        fh: The file ``header`` was read from, opened ``"rb"``.
        header: Its validated header.
        info: One of ``header.tensors``' values.
        chunk_size: Largest chunk yielded.

    Raises:
        BadInputError: the file ended early (it changed after the header was read).
    """
    fh.seek(header.data_offset + info.start)
    remaining = info.nbytes
    while remaining:
        chunk = fh.read(min(chunk_size, remaining))
        if not chunk:
            name = getattr(fh, "name", "file")
            raise BadInputError(
                f"{name}: file changed while reading tensor bytes (truncated)",
                fix="make sure nothing writes the file while adapterkit reads it",
            )
        remaining -= len(chunk)
        yield chunk
