"""Merge-and-unload: bake a LoRA adapter into its base and write a standalone model.

This module is the entry point: it resolves the adapter (a directory, a loaded
adapter, or a stored version materialized into the store's ``tmp/``) and the
quantization settings, then runs the streamed rewrite
(:func:`merging.model.execute.rewrite_model`, shared with
:func:`merging.model.quantize.quantize`); the model is never loaded whole:

1. **Checks before anything is written.** The base layout (headers only), the
   adapter's A/B shapes against the base weights (``BaseMismatchError``), the base
   ``struct_digest`` against the adapter record's fingerprint, and the adapter's
   ``modules_to_save`` tensors for NaN/Inf. LoRA factors are checked for NaN/Inf as
   each module's are read (refused with the module named; the staged output goes).
2. **Streaming** (:mod:`merging.model.plan`, :mod:`merging.model.pipeline`). For each base tensor in file order:
   untouched tensors are copied in the kernel; a LoRA target gets ``W + s·B·A``
   on row ranges of a few MB, rounded once to the base dtype (:mod:`merging.model.rowmerge`); a
   ``modules_to_save`` copy replaces the base tensor. With quantization (or
   ``qlora``) a target is handled whole: QLoRA first replaces ``W`` by
   ``dequantize(quantize(W))``, the weights the adapter was trained against, then
   the merged weight is quantized (:mod:`merging.model.bnb`). Output shards are
   streamed by :class:`merging.model.shard_writer.ShardWriter`, so the peak is a few row
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

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merging.adapter import LoraAdapter, load_adapter
from merging.devices import resolve_device
from merging.model.bnb import QuantSpec
from merging.model.execute import TensorCallback, rewrite_model
from registry.errors import BadInputError, NotFoundError
from registry.fsutil import leased_temp_dir
from registry.formats.safetensors_header import memoized_headers

if TYPE_CHECKING:
    import torch

    from merging.model.results import UnloadResult
    from registry.storage.manifest import Version
    from registry.storage.store import Store


@memoized_headers()  # the adapter's and base's headers are parsed once per unload
def unload(adapter: str | Path | LoraAdapter, base_dir: str | Path, out_dir: str | Path, *,
           store: Store | None = None, max_shard_size: int | str | None = None,
           quantize: str | None = None, qlora: bool = False, double_quant: bool = False,
           blocksize: int = 64, name: str | None = None,
           expected_fingerprint: dict[str, Any] | None = None, probe: bool | None = None,
           progress: Callable[[int], None] | None = None,
           on_tensor: TensorCallback | None = None, sync: bool = True,
           device: str | torch.device = "cpu") -> UnloadResult:
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
        device: Where bitsandbytes quantizes (``cpu``, ``cuda``, ``auto``); the merge
            itself streams on the CPU (a row-range add is memory-bound).

    Returns:
        The :class:`UnloadResult`.

    Raises:
        NotFoundError: adapter, ref or base missing.
        BaseMismatchError: shapes or fingerprint do not match the base.
        BadInputError: NaN/Inf in the adapter or merged weights, bad settings, a
            device torch does not see.
        UnsupportedAdapterError: DoRA and other adapters that cannot be merged.
        ConflictError: ``out_dir`` exists and is not empty.
    """
    where = str(resolve_device(device))  # checked even when unused: one rule for --device
    spec = QuantSpec(quantize, double_quant, blocksize, device=where) if quantize else None
    qspec = None
    if qlora:
        qspec = spec if spec is not None else QuantSpec("nf4", double_quant, blocksize,
                                                        device=where)
    version: Version | None = None
    with contextlib.ExitStack() as stack:
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
            tmp = stack.enter_context(leased_temp_dir(store.root / "tmp", "unload-"))  # gc skips it
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


