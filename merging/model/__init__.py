"""Full-model streaming: bake an adapter into its base, requantize, rebuild.

A model is rewritten tensor by tensor, never loaded whole. The layers, lowest first:

* reading and writing safetensors: :mod:`merging.model.layout` (source layout, tensor
  reader), :mod:`merging.model.shard_plan` (output shards and the index),
  :mod:`merging.model.shard_writer` (streaming writer), :mod:`merging.model.buffers`,
  :mod:`merging.model.output_dir` (staged, atomic output directory);
* numerical primitives: :mod:`merging.model.rowmerge` (``W + s·B·A`` on row ranges),
  :mod:`merging.model.bnb` (bitsandbytes serialization of one weight),
  :mod:`merging.model.probe` (logits drift of a quantized output);
* :mod:`merging.model.plan` decides what happens to each tensor (:class:`Job`),
  :mod:`merging.model.pipeline` executes the jobs on worker threads, and
  :mod:`merging.model.execute` runs a whole rewrite (checks, staging, index, config,
  fingerprints, recording);
* store side: :mod:`merging.model.derived` (fingerprints, records and lineage of
  derived models), :mod:`merging.model.rebuild` (replays a recorded chain);
* entry points: :mod:`merging.model.unload` and :mod:`merging.model.quantize`.

Result types shared by these layers live in :mod:`merging.model.results`. It imports
:mod:`merging.adapter` (the shared reader) and :mod:`merging.dtypes`, never
:mod:`merging.lora`.
"""
