"""The output's files: which tensors go in which shard, and the index naming them.

:func:`plan_shards` keeps the base's file layout by default or packs tensors greedily
in base order under ``max_shard_size``; the plan (:class:`ShardSpec` of
:class:`OutTensor`) is made before anything is written, so each
:class:`merging.model.shard_writer.ShardWriter` can reserve its header up front.
:func:`write_index` writes ``model.safetensors.index.json`` from what the writers
report (:class:`merging.model.results.WrittenShard`). Pure bookkeeping: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging.model.layout import INDEX_NAME, SINGLE_NAME
from merging.model.results import WrittenShard


@dataclass(frozen=True)
class OutTensor:
    """One tensor the output will hold; ``shape`` may be None when its size is not known
    in advance (a bitsandbytes quant-state blob), ``max_bytes`` bounds it then."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    nbytes: int


@dataclass(frozen=True)
class ShardSpec:
    """One output file and the tensors it will hold, in write order."""

    filename: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        """Planned bytes of the file's tensors."""
        return sum(t.nbytes for t in self.tensors)


def plan_shards(groups: Sequence[tuple[str, Sequence[OutTensor]]], *,
                max_shard_size: int | None) -> list[ShardSpec]:
    """Assign output tensors to files.

    Args:
        groups: ``(base file name, tensors)`` in base order; the tensors derived from
            one base tensor form one unit that is never split across files.
        max_shard_size: None keeps the base's files (same names); else tensors are
            packed greedily in order, a new file started when the next unit would
            overflow (a unit bigger than the limit gets a file of its own), and files
            are named ``model-0000i-of-0000n.safetensors`` (``model.safetensors`` if one).
    """
    if max_shard_size is None:
        by_file: dict[str, list[OutTensor]] = {}
        for fname, unit in groups:
            by_file.setdefault(fname, []).extend(unit)
        return [ShardSpec(fname, tuple(ts)) for fname, ts in by_file.items()]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for _fname, unit in groups:
        unit_bytes = sum(t.nbytes for t in unit)
        if shards[-1] and size + unit_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                          for i in range(n)]
    return [ShardSpec(name, tuple(ts)) for name, ts in zip(names, shards, strict=True)]


def write_index(out_dir: Path, shards: Sequence[WrittenShard], *,
                total_parameters: int | None = None) -> None:
    """Write ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``)."""
    metadata: dict[str, Any] = {"total_size": sum(s.nbytes for s in shards)}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    weight_map = {name: s.filename for s in shards for name in s.tensors}
    data = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(data, indent=2) + "\n")
