"""Fingerprints and registry records of derived models (unload / quantize outputs).

The weights digest is :func:`registry.formats.fingerprint.fingerprint_model`'s, computed
from per-tensor sha256 taken while the tensors stream (the test suite checks the two
agree), so neither the base nor the output is read a second time. Outputs are
recorded by reference (:meth:`registry.storage.store.Store.record_derived`): kind ``model``,
no weights copied.

What a rebuild (:mod:`merging.model.rebuild`) needs is recorded with it:

* **lineage parents**: for an unload, the adapter version (role ``adapter``) and, if
  the store records a model with exactly the base's weights, that model (role
  ``base``); for a quantization, the stored model with exactly the source's weights
  (role ``source``: the model that was quantized, e.g. an unloaded merge). ``base``
  parents are context, not custody: promotion's chain of custody skips them.
* **recipe parameters**: every setting of the run (quantization spec, QLoRA spec,
  ``max_shard_size``, which merge arithmetic was used for bfloat16 weights, the file
  layout);
* **report**: the result numbers plus ``environment`` (adapterkit, Python, torch,
  transformers, bitsandbytes, safetensors versions, machine, torch's CPU capability);
* **the tensor list** (:mod:`registry.derived_check`): stored as a blob whose digest
  is the weights digest itself, so a mismatching directory names its first
  differing tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merging.adapter import LoraAdapter
from merging.model.bnb import QuantSpec
from merging.model.layout import ModelLayout
from merging.model.results import WrittenShard
from registry.digests import json_digest
from registry.digests import sha256_digest
from registry.errors import BaseMismatchError
from registry.formats.fingerprint import arch_fields
from registry.formats.safetensors_header import read_header

if TYPE_CHECKING:
    from merging.model.results import UnloadResult
    from registry.storage.manifest import Version
    from registry.storage.store import Store


def weights_digest(entries: list[tuple[str, str, tuple[int, ...], str]]) -> str:
    """``registry.formats.fingerprint``'s weights digest from per-tensor sha256 hex (name order)."""
    return json_digest({"v": 1, "tensors": [[n, d, list(s), h] for n, d, s, h in sorted(entries)]})


def check_base_weights(base_hashes: dict[str, str] | None, layout: ModelLayout, expected: dict[str, Any] | None,
                        base_fp: dict[str, Any], base_dir: Path) -> None:
    """Fill ``base_fp["weights_digest"]`` from the hashes taken while streaming and
    compare it with the recorded one.

    Raises:
        BaseMismatchError: the base's weights are not the recorded ones.
    """
    if base_hashes is None:
        return
    base_fp["weights_digest"] = weights_digest(
        [(n, t.dtype, t.shape, base_hashes[n]) for n, t in layout.tensors.items()])
    want = (expected or {}).get("weights_digest")
    if want and want != base_fp["weights_digest"]:
        raise BaseMismatchError(
            f"{base_dir} has the right structure but other weights than the adapter's base "
            f"(weights digest {base_fp['weights_digest'][:19]} != recorded {want[:19]}); "
            "nothing was written",
            fix="pass the exact base checkpoint the adapter was trained on")


def output_fingerprint(config: dict[str, Any] | None, written: list[WrittenShard]) -> dict[str, Any]:
    """The output's ``fingerprint_model`` digests, from the hashes taken while writing."""
    tensors = {n: info for shard in written for n, info in shard.tensors.items()}
    hashes = {n: h for shard in written for n, h in shard.tensor_sha256.items()}
    struct = json_digest({"v": 1, "tensors": [[n, list(tensors[n][1])] for n in sorted(tensors)],
                          "config": arch_fields(config)})
    weights = weights_digest([(n, d, s, hashes[n]) for n, (d, s) in tensors.items()])
    return {"struct_digest": struct, "weights_digest": weights}


def adapter_digest(adapter: LoraAdapter | None, version: Version | None) -> str | None:
    """The stored version's digest, else a digest of the adapter's two files."""
    if version is not None:
        return version.digest
    if adapter is None:
        return None
    files = {}
    for path in sorted(adapter.path.iterdir()):
        if path.name in ("adapter_config.json", "adapter_model.safetensors"):
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            files[path.name] = "sha256:" + digest.hexdigest()
    return json_digest(files)


def build_environment() -> dict[str, Any]:
    """:func:`registry.derived_check.environment` plus torch's CPU capability."""
    import torch

    from registry.derived_check import environment

    env: dict[str, Any] = environment()
    try:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        env["cpu_capability"] = None
    return env


def bf16_gemm_in_effect() -> bool:
    """Whether bfloat16 LoRA weights take the split-bfloat16 ``addmm`` way here."""
    from merging.model import rowmerge

    return rowmerge.use_bf16_gemm("BF16")


def store_tensor_list(store: Store, written: list[WrittenShard], weights: str | None) -> None:
    """Store the output's tensor list as the blob named by its weights digest."""
    from registry.derived_check import tensor_list_bytes

    if not weights:
        return
    rows = [[n, d, list(s), shard.tensor_sha256[n]]
            for shard in written for n, (d, s) in shard.tensors.items()]
    data = tensor_list_bytes(rows)
    if sha256_digest(data) == weights:  # always, unless the hashes were not taken
        store.put_bytes(data)


def record_derived(store: Store, name: str, result: UnloadResult, adapter: LoraAdapter | None,
                   version: Version | None, base_dir: Path, qlora: QuantSpec | None, *,
                   written: list[WrittenShard] | None = None,
                   max_shard_size: int | None = None,
                   files_at: Path | None = None) -> dict[str, Any]:
    """Record the output in the store by reference (kind ``model``) with its lineage.

    Parents: see the module docstring (``adapter`` + ``base`` for an unload,
    ``source`` for a quantization). The report is the result minus paths:
    fingerprints, adapter digest, per-module norms and quantization errors, notes,
    the logits probe and the environment.

    ``files_at``: where the output files are now (the staging directory, when the record
    is written before the output is renamed to ``result.out_dir``, its recorded location).

    Raises:
        BadInputError: the name or record is invalid.
    """
    from registry.derived_check import config_digest
    from registry.lineage import make_lineage, parent
    from registry.record import TensorSummary, build_model_record

    dtypes: dict[str, int] = {}
    params = 0
    for shard in (read_header((files_at or result.out_dir) / f) for f in result.files):
        for info in shard.tensors.values():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            params += info.numel
    base_rec = (version.record.get("base_model") or {}) if version is not None else {}
    record = build_model_record(
        result.output_fingerprint, tensors=TensorSummary(result.tensors, dtypes, params),
        location=str(result.out_dir), quantization=result.quantization,
        config=config_digest(files_at or result.out_dir),
        base_model=base_rec.get("id") or str(Path(base_dir).absolute()),
        base_revision=base_rec.get("revision"), base_fingerprint=result.base_fingerprint)
    parents = [parent(version, role="adapter")] if version is not None else []
    base_wd = (result.base_fingerprint or {}).get("weights_digest")
    for candidate in store.versions():
        weights = candidate.record.get("weights") if candidate.kind == "model" else None
        if base_wd and weights and weights.get("weights_digest") == base_wd:
            parents.append(parent(candidate, role="base" if adapter is not None else "source"))
            break
    report = {k: v for k, v in result.to_json().items() if k not in ("out_dir", "version")}
    report["environment"] = build_environment()
    lineage = make_lineage(parents, method="unload" if adapter is not None else "quantize",
                           parameters={"quantization": result.quantization and {
                               k: v for k, v in result.quantization.items()
                               if k != "overall_rel_error"},
                               "qlora": qlora.to_json() if qlora else None,
                               "max_shard_size": max_shard_size,
                               "bf16_gemm": bf16_gemm_in_effect(),
                               "files": list(result.files)},
                           report=report)
    if written is not None:
        store_tensor_list(store, written, (result.output_fingerprint or {}).get("weights_digest"))
    pushed = store.record_derived(name, record, lineage)
    return {"name": name, "ref": pushed.version.ref, "digest": pushed.version.digest,
            "created": pushed.created}
