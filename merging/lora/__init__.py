"""LoRA-space merging: several adapters in, one adapter out.

Everything here works on LoRA factors and their true deltas ``s·B·A`` (never on a
base model): the method registry (:mod:`merging.lora.methods`), the per-module
engine (:mod:`merging.lora.engine`) with its option parsing (:mod:`merging.lora.options`)
and result type (:mod:`merging.lora.results`), its numerical kernels (:mod:`merging.lora.sparsify`,
:mod:`merging.lora.factorize`, :mod:`merging.lora.align`), the PEFT writer
(:mod:`merging.lora.peft_output`), the live PEFT wrap the search scores with
(:mod:`merging.lora.live`), and the store side: :mod:`merging.lora.publish` (the one
push path of every merge) and :mod:`merging.lora.merge_versions` (the ``adapters
merge`` use case). It imports :mod:`merging.adapter` (the shared reader) and
:mod:`merging.dtypes`, never :mod:`merging.model`.
"""
