"""Result types of the model pipeline, shared by its layers.

:class:`WrittenShard` is what a :class:`merging.model.shard_writer.ShardWriter` reports
and what the index, fingerprints and tensor list are built from;
:class:`ModuleReport` is what happened to one tensor; :class:`UnloadResult` is what
:func:`merging.model.unload.unload`, :func:`merging.model.quantize.quantize` and
:func:`merging.model.rebuild.rebuild` return. They live in one dependency-free module
so the writer, the shard plan, the executor and the recorder share them without
importing each other (the writer and the layout module used to import each other for
these types).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one output tensor.

    Attributes:
        name: Tensor key (``model.layers.0.self_attn.q_proj.weight``).
        kind: ``lora``, ``replaced`` (modules_to_save), ``untied`` (the ``lm_head`` copy
            written when untying) or ``quantized``.
        delta_fro: Frobenius norm of ``s·B·A`` (of new - old for replacements).
        weight_fro: Frobenius norm of the merged weight.
        quant_rel_error: ``||W - deq(q(W))||_F / ||W||_F`` when quantized.
    """

    name: str
    kind: str
    delta_fro: float | None = None
    weight_fro: float | None = None
    quant_rel_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "kind": self.kind, "delta_fro": self.delta_fro,
                "weight_fro": self.weight_fro, "quant_rel_error": self.quant_rel_error}


@dataclass(frozen=True)
class WrittenShard:
    """What :meth:`ShardWriter.close` reports."""

    filename: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    nbytes: int
    tensor_sha256: dict[str, str]


@dataclass(frozen=True)
class UnloadResult:
    """Outcome of :func:`unload` / :func:`merging.model.quantize.quantize`.

    Attributes:
        out_dir: The published model directory.
        files: Its weight files.
        tensors: Tensors written.
        total_bytes: Tensor bytes written.
        modules: Per-tensor reports (merged, replaced, quantized).
        notes: What the user should know (untied embeddings, QLoRA settings).
        untied: ``tie_word_embeddings`` was switched off.
        base_fingerprint: The base's structure digest (and weights digest if hashed).
        output_fingerprint: The output's, when recorded (hashed while writing).
        adapter_digest: The adapter version's digest, or for an adapter directory
            recorded into a store, a digest of its files; ``None`` otherwise (an
            unrecorded unload hashes nothing).
        quantization: Settings and overall relative error, when quantized.
        probe: Logits drift against the unquantized merge, when measured.
        version: The recorded version (name, ref, digest), when recorded.
    """

    out_dir: Path
    files: tuple[str, ...]
    tensors: int
    total_bytes: int
    modules: tuple[ModuleReport, ...]
    notes: tuple[str, ...] = ()
    untied: bool = False
    base_fingerprint: dict[str, Any] | None = None
    output_fingerprint: dict[str, Any] | None = None
    adapter_digest: str | None = None
    quantization: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    version: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form (CLI ``--json`` output and the lineage report)."""
        return {"out_dir": str(self.out_dir), "files": list(self.files), "tensors": self.tensors,
                "total_bytes": self.total_bytes, "modules": [m.to_json() for m in self.modules],
                "notes": list(self.notes), "untied": self.untied,
                "base_fingerprint": self.base_fingerprint,
                "output_fingerprint": self.output_fingerprint,
                "adapter_digest": self.adapter_digest, "quantization": self.quantization,
                "probe": self.probe, "version": self.version}
