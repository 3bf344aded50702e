"""Merge-and-unload: bake a LoRA adapter into its base and write a standalone model.

The model is rewritten tensor by tensor (:func:`rewrite_model`, shared with
:func:`merging.quantize.quantize`), never loaded whole:

1. **Checks before anything is written.** The base layout (headers only), the
   adapter's A/B shapes against the base weights (``BaseMismatchError``), the base
   ``struct_digest`` against the adapter record's fingerprint, and the adapter's
   ``modules_to_save`` tensors for NaN/Inf. LoRA factors are checked for NaN/Inf as
   each module's are read (refused with the module named; the staged output goes).
2. **Streaming** (:mod:`merging.rewrite`). For each base tensor in file order:
   untouched tensors are copied in the kernel; a LoRA target gets ``W + s·B·A``
   on row ranges of a few MB, rounded once to the base dtype (:mod:`merging.rowmerge`); a
   ``modules_to_save`` copy replaces the base tensor. With quantization (or
   ``qlora``) a target is handled whole: QLoRA first replaces ``W`` by
   ``dequantize(quantize(W))``, the weights the adapter was trained against, then
   the merged weight is quantized (:mod:`merging.quantize`). Output shards are
   streamed by :class:`merging.shard_writer.ShardWriter`, so the peak is a few row
   ranges (one module when quantizing), never a shard.
3. **Tied embeddings.** If ``tie_word_embeddings`` is set and the adapter changes only
   one side (``embed_tokens`` or ``lm_head``), the output unties them: both tensors are
   written and ``config.json`` says ``tie_word_embeddings: false`` (reported in
   ``notes``). With PEFT's ``ensure_weight_tying`` both sides change together and the
   tie is kept.
4. **Atomic output.** Everything goes to a temp directory next to ``OUT_DIR``; a base
   ``weights_digest`` recorded by the adapter is verified on the bytes as they stream
   (so a correct base is read once, not twice) and a mismatch, a NaN, an error or an
   interrupt removes the temp directory: nothing appears at ``OUT_DIR``.
5. **Lineage.** With a store, the output is recorded by reference (kind ``model``,
   no weights copied) with its fingerprint (from hashes taken while writing), the
   base fingerprint, the adapter version as parent and the per-module report.

PEFT's own ``merge_and_unload`` on a bf16 model rounds the delta to bf16 and adds in
bf16; here the sum is formed in float32 and rounded once, so a bf16 result can differ
from PEFT's by one bf16 rounding (float32 results are bitwise equal in the tests).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from merging.adapter import LoraAdapter, ModuleInfo, load_adapter
from merging.derived import (adapter_digest, check_base_weights, output_fingerprint,
                             record_derived)
from merging.jobs import Job, UnloadResult
from merging.output_dir import copy_non_weight_files, staged_output
from merging.quantize import (PROBE_SHAPE, QuantSpec, load_logits, logits_drift, planned_outputs,
                              quantizable_weights, reference_logits)
from merging.rewrite import Rewrite
from merging.shard_writer import ShardWriter, WrittenShard
from merging.shards import (ModelLayout, OutTensor, parse_size, plan_shards, read_layout,
                            torch_dtype, torch_threads, write_index)
from registry.formats.base_check import EMBEDDING_SUFFIXES, check_against_base
from registry.errors import BadInputError, BaseMismatchError, NotFoundError
from registry.formats.fingerprint import fingerprint_model, model_config
from registry.formats.peft_keys import base_key_for_extra, base_weight_key
from registry.formats.safetensors_header import memoized_headers, read_header

PROBE_MAX_BYTES = 2 << 30
"""Logits drift is measured by default only for models up to this many weight bytes
(the probe holds the unquantized model in memory)."""
HEAD_KEY = "lm_head.weight"
COMPUTE_THREADS = 1
"""torch threads while streaming. The work is memory-bound and rank-r skinny; with
two OpenMP threads on a busy 2-core box, barrier waits made small ops 10-50x slower
(17 s vs 3.5 s for a 0.65 GB model), and one thread is as fast when idle."""
OPEN_SHARDS = 16
"""Output shards written at once (see :func:`_write_shards`)."""
TensorCallback = Callable[[str], None]


# --------------------------------------------------------------------------- entry point

@memoized_headers()  # the adapter's and base's headers are parsed once per unload
def unload(adapter: str | Path | LoraAdapter, base_dir: str | Path, out_dir: str | Path, *,
           store: Any = None, max_shard_size: int | str | None = None,
           quantize: str | None = None, qlora: bool = False, double_quant: bool = False,
           blocksize: int = 64, name: str | None = None,
           expected_fingerprint: dict[str, Any] | None = None, probe: bool | None = None,
           progress: Callable[[int], None] | None = None,
           on_tensor: TensorCallback | None = None, sync: bool = True) -> UnloadResult:
    """Merge a LoRA adapter into its base and write a standalone model directory.

    Args:
        adapter: A PEFT adapter directory, a loaded :class:`LoraAdapter`, or a registry
            ref (needs ``store``).
        base_dir: The base model directory (safetensors, one file or sharded).
        out_dir: Output directory; must not exist or be empty.
        store: A :class:`registry.storage.store.Store`: resolves refs and records the result.
        max_shard_size: Reshard the output (``"2GB"``); default keeps the base's files.
        quantize: ``nf4``/``fp4``/``int8``: quantize the merged model in the same pass.
        qlora: Merge into ``dequantize(quantize(W))`` (the adapter trained on a 4-bit
            base); uses ``quantize``'s settings, else nf4.
        double_quant, blocksize: Quantization settings (see :class:`QuantSpec`).
        name: Record the output under this name (default for a stored adapter:
            ``<adapter name>-unloaded``); needs ``store``.
        expected_fingerprint: ``{struct_digest, weights_digest}`` the base must match
            (default: the stored adapter's record, if any).
        probe: Measure logits drift of a quantized output (default: small models).
        progress: Called with base bytes processed.
        on_tensor: Called with each output tensor's name once written (tests use it
            to interrupt).
        sync: fsync the files before publishing the directory (default). ``False``
            is for scratch output: a power cut may then leave truncated files.

    Returns:
        The :class:`UnloadResult`.

    Raises:
        NotFoundError: adapter, ref or base missing.
        BaseMismatchError: shapes or fingerprint do not match the base.
        BadInputError: NaN/Inf in the adapter or merged weights, bad settings.
        UnsupportedAdapterError: DoRA and other adapters that cannot be merged.
        ConflictError: ``out_dir`` exists and is not empty.
    """
    spec = QuantSpec(quantize, double_quant, blocksize) if quantize else None
    qspec = None
    if qlora:
        qspec = spec if spec is not None else QuantSpec("nf4", double_quant, blocksize)
    version, tmp = None, None
    try:
        if isinstance(adapter, LoraAdapter):
            loaded = adapter
        elif Path(adapter).is_dir():
            loaded = load_adapter(adapter)
        elif store is None:
            raise NotFoundError(f"{adapter}: no such adapter directory",
                                fix="pass a PEFT adapter directory, or a ref with a store")
        else:
            version = store.resolve(str(adapter))
            if version.kind != "adapter":
                raise BadInputError(f"{version.ref} is a {version.kind}, not an adapter",
                                    fix="unload an adapter version")
            tmp = Path(tempfile.mkdtemp(prefix="unload-", dir=store.root / "tmp"))
            loaded = load_adapter(store.materialize(version, tmp))
            recorded = (version.record.get("base_model") or {}).get("fingerprint")
            expected_fingerprint = expected_fingerprint or recorded
        if version is not None and name is None:
            name = f"{version.name}-unloaded" + (f"-{quantize}" if quantize else "")
        return rewrite_model(base_dir, out_dir, adapter=loaded, quant=spec, qlora=qspec,
                             max_shard_size=max_shard_size, expected=expected_fingerprint,
                             probe=probe, store=store if name else None, name=name,
                             adapter_version=version, progress=progress, on_tensor=on_tensor,
                             sync=sync)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- planning

def _tied(config: dict[str, Any]) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _adapter_plan(adapter: LoraAdapter, layout: ModelLayout, config: dict[str, Any]
                  ) -> tuple[dict[str, ModuleInfo], dict[str, str]]:
    """Base key -> LoRA module, base key -> replacing adapter tensor (shapes checked)."""
    header = read_header(adapter.weights_path)
    check_against_base({n: i.keys for n, i in adapter.infos.items()}, adapter.extras, header,
                       adapter.config, layout.model_dir)
    loras = {base_weight_key(n): info for n, info in adapter.infos.items()}
    replacements: dict[str, str] = {}
    for extra in adapter.extras:
        key = base_key_for_extra(extra)
        if key not in layout.tensors and not (key == HEAD_KEY and _tied(config)):
            raise BaseMismatchError(f"adapter tensor {extra}: the base has no tensor {key!r}",
                                    fix="check that the base is the one the adapter was trained on")
        if key in loras and not extra.endswith(".base_layer.weight"):
            raise BadInputError(f"{key} is both LoRA-adapted and replaced by {extra}",
                                fix="re-save the adapter with PeftModel.save_pretrained")
        replacements[key] = extra
    return loras, replacements


def _plan_jobs(layout: ModelLayout, config: dict[str, Any], adapter: LoraAdapter | None
               ) -> tuple[list[Job], bool, list[str]]:
    """Jobs in base order, whether the embeddings get untied, and notes."""
    loras, replacements = _adapter_plan(adapter, layout, config) if adapter else ({}, {})
    fan_in_fan_out = bool(adapter and adapter.config.get("fan_in_fan_out"))
    jobs: list[Job] = []
    for key, src in layout.tensors.items():
        job = Job(src, key, lora=loras.get(key), replacement=replacements.get(key))
        if job.lora is not None:
            job.kind, job.transposed = "lora", job.lora.embedding or fan_in_fan_out
        elif job.replacement is not None:
            job.kind = "replaced"
        jobs.append(job)
    notes: list[str] = []
    embeds = [k for k in layout.tensors if k.endswith(EMBEDDING_SUFFIXES)]
    if not (_tied(config) and len(embeds) == 1):
        return jobs, False, notes
    embed, touched = embeds[0], set(loras) | set(replacements)
    if not ({embed, HEAD_KEY} & touched):
        return jobs, False, notes
    if adapter is not None and adapter.config.get("ensure_weight_tying"):
        notes.append("tied embeddings kept: ensure_weight_tying changes both sides together")
        return jobs, False, notes
    if {embed, HEAD_KEY} <= set(replacements) and torch.equal(
            adapter.extra_tensor(replacements[embed]), adapter.extra_tensor(replacements[HEAD_KEY])):
        notes.append("tied embeddings kept: both sides replaced by the same tensor")
        return jobs, False, notes
    side = " and ".join(sorted({embed, HEAD_KEY} & touched))
    notes.append(f"untied embeddings: the adapter changes {side} only on one side of the tie, "
                 "so both tensors are written and tie_word_embeddings is set to false")
    if HEAD_KEY not in layout.tensors:
        at = next(i for i, j in enumerate(jobs) if j.out_name == embed)
        head = Job(layout.tensors[embed], HEAD_KEY, lora=loras.get(HEAD_KEY),
                   replacement=replacements.get(HEAD_KEY), hash_src=False, kind="untied")
        if head.lora is not None:
            head.kind, head.transposed = "lora", head.lora.embedding or fan_in_fan_out
        elif head.replacement is not None:
            head.kind = "replaced"
        jobs.insert(at + 1, head)
    return jobs, True, notes


def _model_dtype(config: dict[str, Any], layout: ModelLayout) -> torch.dtype:
    value = config.get("dtype") or config.get("torch_dtype")
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    floats = [t.dtype for t in layout.tensors.values() if t.dtype in ("F32", "F16", "BF16")]
    return torch_dtype(max(set(floats), key=floats.count)) if floats else torch.float32


def _outputs(job: Job, spec: QuantSpec | None) -> list[OutTensor]:
    if job.quant and spec is not None:
        return planned_outputs(job.out_name, job.src.shape, spec)
    return [OutTensor(job.out_name, job.src.dtype, job.src.shape, job.src.info.nbytes)]


def _write_shards(run: Rewrite, jobs: list[Job], shards: list[Any], stage: Path,
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


@memoized_headers()
def rewrite_model(base_dir: str | Path, out_dir: str | Path, *, adapter: LoraAdapter | None,
                  quant: QuantSpec | None = None, qlora: QuantSpec | None = None,
                  max_shard_size: int | str | None = None,
                  expected: dict[str, Any] | None = None, probe: bool | None = None,
                  store: Any = None, name: str | None = None, adapter_version: Any = None,
                  progress: Callable[[int], None] | None = None,
                  on_tensor: TensorCallback | None = None, sync: bool = True) -> UnloadResult:
    """The streaming rewriter behind :func:`unload` and :func:`merging.quantize.quantize`.

    Raises:
        As :func:`unload`.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir).absolute()
    max_bytes = parse_size(max_shard_size)
    layout = read_layout(base_dir)
    config = model_config(base_dir) or {}
    if "quantization_config" in config:
        raise BadInputError(f"{base_dir} is already quantized",
                            fix="start from the unquantized (float) model")
    base_fp = fingerprint_model(base_dir, weights=False).to_json()
    if expected and expected.get("struct_digest") and \
            expected["struct_digest"] != base_fp["struct_digest"]:
        raise BaseMismatchError(
            f"{base_dir} is not the base this adapter was trained on (structure digest "
            f"{base_fp['struct_digest'][:19]} != recorded {expected['struct_digest'][:19]})",
            fix="pass the base model the adapter's record names")
    jobs, untied, notes = _plan_jobs(layout, config, adapter)
    out_config = json.loads(json.dumps(config))
    if untied:
        out_config["tie_word_embeddings"] = False
        if isinstance(out_config.get("text_config"), dict):
            out_config["text_config"]["tie_word_embeddings"] = False
    dtype = _model_dtype(config, layout)
    if quant is not None:
        out_config["quantization_config"] = quant.bnb_config(dtype)
        targets = quantizable_weights(out_config, quant)
        for job in jobs:
            job.quant = job.out_name in targets
            job.transposed_q = targets.get(job.out_name, False)
    if qlora is not None:
        trained = quantizable_weights(config, qlora)
        for job in jobs:
            job.qlora = job.src.name in trained and job.out_name == job.src.name
            job.transposed_q = job.transposed_q or trained.get(job.src.name, False)
    want_probe = quant is not None and (probe if probe is not None
                                        else layout.total_bytes <= PROBE_MAX_BYTES)
    hash_all = store is not None or bool(expected and expected.get("weights_digest"))
    shards = plan_shards([(job.src.file.name, _outputs(job, quant)) for job in jobs],
                         max_shard_size=max_bytes)
    run = Rewrite(adapter, quant, qlora, hash_base=hash_all, collect=want_probe,
                  progress=progress, on_tensor=on_tensor)
    written: list[WrittenShard] = []
    probe_report: dict[str, Any] | None = None
    out_fp: dict[str, Any] | None = None
    # a stored adapter's digest is its version's; a directory's (a sha256 of its files)
    # is computed, while the model streams, only when the lineage records it: an
    # unrecorded unload hashes nothing, like the base and the output (~7% of its time)
    side = ThreadPoolExecutor(1, "adapter-digest")
    digest = side.submit(adapter_digest, adapter if store is not None else None,
                         adapter_version)
    try:
        with torch_threads(COMPUTE_THREADS):
            if adapter is not None:
                run.check_adapter_finite()
        with staged_output(out_dir, sync=sync) as stage:
            with torch_threads(COMPUTE_THREADS):
                written = _write_shards(run, jobs, shards, stage, hash_all, sync)
            check_base_weights(run.base_hashes, layout, expected, base_fp, base_dir)
            if len(written) > 1 or (layout.indexed and max_bytes is None):
                write_index(stage, written, total_parameters=sum(
                    math.prod(job.src.shape) for job in jobs))
            copy_non_weight_files(base_dir, stage, layout.weight_files() | {"config.json"})
            if config:
                (stage / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
            if want_probe:
                probe_report = _probe(stage, out_config, run.state or {})
            if hash_all:
                out_fp = output_fingerprint(out_config if config else None, written)
    finally:
        run.close()
        side.shutdown(wait=True)
    quant_report = None
    if quant is not None:
        err_sq, w_sq = run.quant_sq
        quant_report = {**quant.to_json(), "overall_rel_error": math.sqrt(err_sq / w_sq)
                        if w_sq else 0.0}
    if qlora is not None:
        notes.append(f"qlora: merged into dequantize(quantize(W)) with {qlora.method}, "
                     f"blocksize {qlora.blocksize}, double_quant {qlora.double_quant}")
    result = UnloadResult(
        out_dir=out_dir, files=tuple(s.filename for s in written),
        tensors=sum(len(s.tensors) for s in written), total_bytes=sum(s.nbytes for s in written),
        modules=tuple(run.reports), notes=tuple(notes), untied=untied,
        base_fingerprint=base_fp, output_fingerprint=out_fp,
        adapter_digest=digest.result(), quantization=quant_report,
        probe=probe_report)
    if store is not None and name:
        result = replace(result, version=record_derived(
            store, name, result, adapter, adapter_version, base_dir, qlora, written=written,
            max_shard_size=max_bytes))
    return result


def _probe(stage: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Logits drift of the written (quantized) model vs the unquantized tensors."""
    try:
        reference = reference_logits(config, state)
        state.clear()
        drift = logits_drift(reference, load_logits(stage))
    except Exception as err:  # noqa: BLE001 - the probe is a report, not a requirement
        return {"skipped": f"{type(err).__name__}: {str(err)[:200]}"}
    return {"batch": list(PROBE_SHAPE), **drift}
