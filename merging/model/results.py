"""What a streamed rewrite does to each base tensor, and what it reports.

:func:`merging.model.unload.rewrite_model` plans one :class:`Job` per output tensor (in base
file order) and :class:`merging.model.pipeline.Rewrite` executes them; every tensor that was
merged, replaced or quantized gets a :class:`ModuleReport` in the
:class:`UnloadResult` (and in the lineage record of a recorded unload).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging.adapter import ModuleInfo
from merging.model.layout import SourceTensor


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


@dataclass
class Job:
    """One base tensor (or the synthesized untied ``lm_head``) and what to do with it.

    Attributes:
        src: Where the base bytes are.
        out_name: The output tensor's key (``lm_head.weight`` when untying).
        lora: The LoRA module merged into it, if any.
        replacement: Adapter tensor that replaces it (``modules_to_save``), if any.
        quant: Quantize the result (bitsandbytes serialization).
        qlora: Replace the base by ``dequantize(quantize(W))`` before merging.
        transposed: The weight is ``(in, out)`` (Conv1D, embeddings): rows of the
            delta are columns of A.
        transposed_q: The stored weight is ``(in, out)`` (Conv1D): it is quantized (and
            round-tripped for QLoRA) as its transpose, the layout transformers uses.
        hash_src: The base bytes count towards the base hash and progress (False for
            the second use of a tied tensor).
        kind: ``copy``, ``lora``, ``replaced`` or ``untied`` (the report's kind).
    """

    src: SourceTensor
    out_name: str
    lora: ModuleInfo | None = None
    replacement: str | None = None
    quant: bool = False
    qlora: bool = False
    transposed: bool = False
    transposed_q: bool = False
    hash_src: bool = True
    kind: str = "copy"


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
