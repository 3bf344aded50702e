"""One streamed rewrite of a model directory, from checks to the published output.

:func:`rewrite_model` is what :func:`merging.model.unload.unload` (with an adapter),
:func:`merging.model.quantize.quantize` (without) and :mod:`merging.model.rebuild` run:

1. check the source (headers only): not already quantized, the structure the adapter
   was trained on;
2. plan (:mod:`merging.model.plan`): one job per output tensor, which of them are
   quantized or QLoRA round-tripped (:mod:`merging.model.bnb`), the output config, the
   shards (:mod:`merging.model.shard_plan`);
3. execute (:class:`merging.model.pipeline.Rewrite`) into a staged directory
   (:mod:`merging.model.output_dir`), :data:`OPEN_SHARDS` writers at a time, verifying
   the base's recorded weights digest on the bytes as they stream;
4. write the index, non-weight files and config, probe the logits drift of a quantized
   output (:mod:`merging.model.probe`), publish atomically, and record the output by
   reference when asked (:mod:`merging.model.derived`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merging.adapter import LoraAdapter
from merging.model.bnb import QuantSpec, quantizable_weights
from merging.model.derived import (adapter_digest, check_base_weights, output_fingerprint,
                                   record_derived)
from merging.model.layout import ModelLayout, parse_size, read_layout, torch_threads
from merging.model.output_dir import copy_non_weight_files, staged_output
from merging.model.pipeline import Rewrite
from merging.model.plan import Job, check_one_float_dtype, model_dtype, plan_jobs, planned_tensors
from merging.model.probe import PROBE_MAX_BYTES, probe_written
from merging.model.results import UnloadResult, WrittenShard
from merging.model.shard_plan import ShardSpec, plan_shards, write_index
from merging.model.shard_writer import ShardWriter
from registry.errors import BadInputError, BaseMismatchError
from registry.formats.fingerprint import fingerprint_model, model_config
from registry.formats.safetensors_header import memoized_headers
from registry.fsutil import check_outside
from registry.storage.failpoints import failpoint
from registry.storage.publish import check_name_kind
from registry.storage.refs import validate_name

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.store import Store

COMPUTE_THREADS = 1
"""torch threads while streaming. The work is memory-bound and rank-r skinny; with
two OpenMP threads on a busy 2-core box, barrier waits made small ops 10-50x slower
(17 s vs 3.5 s for a 0.65 GB model), and one thread is as fast when idle."""
OPEN_SHARDS = 16
"""Output shards written at once (see :func:`write_shards`)."""
TensorCallback = Callable[[str], None]
"""Called with each output tensor's name once written."""


def check_source(base_dir: Path, config: dict[str, Any], expected: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """The source's structure fingerprint, checked against ``expected``.

    Raises:
        BadInputError: The source is already quantized.
        BaseMismatchError: Its structure digest is not the expected one.
    """
    if "quantization_config" in config:
        raise BadInputError(f"{base_dir} is already quantized",
                            fix="start from the unquantized (float) model")
    base_fp = fingerprint_model(base_dir, weights=False).to_json()
    found = str(base_fp["struct_digest"])  # always set; only weights_digest may be None
    if expected and expected.get("struct_digest") and expected["struct_digest"] != found:
        raise BaseMismatchError(
            f"{base_dir} is not the base this adapter was trained on (structure digest "
            f"{found[:19]} != recorded {expected['struct_digest'][:19]})",
            fix="pass the base model the adapter's record names")
    return base_fp


def output_config(config: dict[str, Any], layout: ModelLayout, jobs: list[Job], untied: bool,
                  quant: QuantSpec | None, qlora: QuantSpec | None) -> dict[str, Any]:
    """The output's ``config.json``; marks the jobs to quantize / round-trip on the way.

    Raises:
        BadInputError: The architecture is unknown to transformers (when quantizing).
    """
    out_config = json.loads(json.dumps(config))
    if untied:
        out_config["tie_word_embeddings"] = False
        if isinstance(out_config.get("text_config"), dict):
            out_config["text_config"]["tie_word_embeddings"] = False
    if quant is not None:
        out_config["quantization_config"] = quant.bnb_config(model_dtype(config, layout))
        targets = quantizable_weights(out_config, quant)
        for job in jobs:
            job.quant = job.out_name in targets
            job.transposed_q = targets.get(job.out_name, False)
    if qlora is not None:
        trained = quantizable_weights(config, qlora)
        for job in jobs:
            job.qlora = job.src.name in trained and job.out_name == job.src.name
            job.transposed_q = job.transposed_q or trained.get(job.src.name, False)
    return out_config


def write_shards(run: Rewrite, jobs: list[Job], shards: list[ShardSpec], stage: Path,
                 hash_all: bool, sync: bool) -> list[WrittenShard]:
    """Shards are written :data:`OPEN_SHARDS` at a time, their writers open together
    (the fast path interleaves them); more at once would only cost file descriptors
    (``--max-shard-size 100MB`` on a 70B model is 1,400 shards)."""
    spans, position = [], 0
    for shard in shards:
        names = {t.name for t in shard.tensors}
        end = position
        while end < len(jobs) and jobs[end].out_name in names:
            end += 1
        spans.append((shard, jobs[position:end]))
        position = end
    written: list[WrittenShard] = []
    for start in range(0, len(spans), OPEN_SHARDS):
        parts: list[tuple[list[Job], ShardWriter]] = []
        try:
            for shard, shard_jobs in spans[start:start + OPEN_SHARDS]:
                parts.append((shard_jobs, ShardWriter(stage / shard.filename, shard.tensors,
                                                      hash_tensors=hash_all, sync=sync)))
            run.write(parts)
            written.extend(writer.close() for _, writer in parts)
        finally:
            for _, writer in parts:
                writer.abort()
    return written




def finish_stage(stage: Path, written: list[WrittenShard], jobs: list[Job], layout: ModelLayout,
                 base_dir: Path, config: dict[str, Any], out_config: dict[str, Any], *,
                 indexed: bool) -> None:
    """Everything but the weights: the index (``indexed``), the base's other files and
    the output ``config.json`` (when the base has one)."""
    if indexed:
        write_index(stage, written, total_parameters=sum(math.prod(job.src.shape) for job in jobs))
    copy_non_weight_files(base_dir, stage, layout.weight_files() | {"config.json"})
    if config:
        (stage / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")


def _quant_report(run: Rewrite, quant: QuantSpec | None) -> dict[str, Any] | None:
    if quant is None:
        return None
    err_sq, w_sq = run.quant_sq
    return {**quant.to_json(), "overall_rel_error": math.sqrt(err_sq / w_sq) if w_sq else 0.0}


@memoized_headers()
def rewrite_model(base_dir: str | Path, out_dir: str | Path, *, adapter: LoraAdapter | None,
                  quant: QuantSpec | None = None, qlora: QuantSpec | None = None,
                  max_shard_size: int | str | None = None,
                  expected: dict[str, Any] | None = None, probe: bool | None = None,
                  store: Store | None = None, name: str | None = None,
                  adapter_version: Version | None = None,
                  progress: Callable[[int], None] | None = None,
                  on_tensor: TensorCallback | None = None, sync: bool = True) -> UnloadResult:
    """Rewrite the model in ``base_dir`` into ``out_dir`` (module docstring).

    Args:
        base_dir, out_dir, max_shard_size, probe, progress, on_tensor, sync: As
            :func:`merging.model.unload.unload`.
        adapter: The adapter to merge in, or None (copy / quantize only).
        quant: Quantize the output with these settings.
        qlora: Merge into ``dequantize(quantize(W))`` with these settings.
        expected: ``{struct_digest, weights_digest}`` the base must match.
        store, name: Record the output in ``store`` under ``name`` (both needed).
        adapter_version: The adapter's stored version (lineage parent), if any.

    Returns:
        The :class:`merging.model.results.UnloadResult`.

    Raises:
        As :func:`merging.model.unload.unload`.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir).absolute()
    if store is not None:
        check_outside(out_dir, store.root)
    if store is not None and name:  # before the model is written, not when it is recorded
        check_name_kind(store, validate_name(name), "model")
    max_bytes = parse_size(max_shard_size)
    layout = read_layout(base_dir)
    config = model_config(base_dir) or {}
    base_fp = check_source(base_dir, config, expected)
    check_one_float_dtype(layout, config, quant)
    jobs, untied, notes = plan_jobs(layout, config, adapter)
    out_config = output_config(config, layout, jobs, untied, quant, qlora)
    want_probe = quant is not None and (probe if probe is not None
                                        else layout.total_bytes <= PROBE_MAX_BYTES)
    hash_all = store is not None or bool(expected and expected.get("weights_digest"))
    shards = plan_shards([(job.src.file.name, planned_tensors(job, quant)) for job in jobs],
                         max_shard_size=max_bytes)
    run = Rewrite(adapter, quant, qlora, hash_base=hash_all, collect=want_probe,
                  progress=progress, on_tensor=on_tensor)
    written: list[WrittenShard] = []
    probe_report = out_fp = None
    # a stored adapter's digest is its version's; a directory's is hashed while the model streams,
    # only when the lineage records it (an unrecorded unload hashes nothing: ~7% of its time)
    side = ThreadPoolExecutor(1, "adapter-digest")
    digest = side.submit(adapter_digest, adapter if store is not None else None,
                         adapter_version)
    try:
        with torch_threads(COMPUTE_THREADS):
            if adapter is not None:
                run.check_adapter_finite()
        with staged_output(out_dir, sync=sync) as stage:
            with torch_threads(COMPUTE_THREADS):
                written = write_shards(run, jobs, shards, stage, hash_all, sync)
            check_base_weights(run.base_hashes, layout, expected, base_fp, base_dir)
            finish_stage(stage, written, jobs, layout, base_dir, config, out_config,
                         indexed=len(written) > 1 or (layout.indexed and max_bytes is None))
            if want_probe:
                probe_report = probe_written(stage, out_config, run.state or {})
            if hash_all:
                out_fp = output_fingerprint(out_config if config else None, written)
            result = _result(run, out_dir, written, notes, untied, base_fp, out_fp,
                             digest.result(), quant, qlora, probe_report)
            if store is not None and name:
                # recorded before the output appears (the block's end renames it): a kill in
                # between leaves a version and no output, and a rerun publishes the same bytes
                result = replace(result, version=record_derived(
                    store, name, result, adapter, adapter_version, base_dir, qlora,
                    written=written, max_shard_size=max_bytes, files_at=stage))
                failpoint("out.before_publish")
    finally:
        run.close()
        side.shutdown(wait=True)
    return result


def _result(run: Rewrite, out_dir: Path, written: list[WrittenShard], notes: list[str],
            untied: Any, base_fp: Any, out_fp: Any, adapter_digest: str | None,
            quant: QuantSpec | None, qlora: QuantSpec | None, probe: Any) -> UnloadResult:
    if qlora is not None:
        notes.append(f"qlora: merged into dequantize(quantize(W)) with {qlora.method}, "
                     f"blocksize {qlora.blocksize}, double_quant {qlora.double_quant}")
    return UnloadResult(
        out_dir=out_dir, files=tuple(s.filename for s in written),
        tensors=sum(len(s.tensors) for s in written), total_bytes=sum(s.nbytes for s in written),
        modules=tuple(run.reports), notes=tuple(notes), untied=untied, base_fingerprint=base_fp,
        output_fingerprint=out_fp, adapter_digest=adapter_digest,
        quantization=_quant_report(run, quant), probe=probe)
