"""Planning a streamed rewrite: what happens to each base tensor, decided before writing.

:func:`plan_jobs` turns the base layout and the adapter into one :class:`Job` per
output tensor, in base file order: copy it, merge a LoRA module into it, replace it by
a ``modules_to_save`` copy, or (when the adapter changes one side of tied embeddings)
write a second, untied ``lm_head``. :mod:`merging.model.execute` then marks the jobs to
quantize and plans the shards from :func:`planned_tensors`; :mod:`merging.model.pipeline`
executes the jobs. Planning reads headers only (and, to decide a tie, the two
replacement tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from merging.adapter import LoraAdapter, ModuleInfo
from merging.dtypes import torch_dtype
from merging.model.bnb import QuantSpec, planned_outputs
from merging.model.layout import ModelLayout, SourceTensor
from merging.model.shard_plan import OutTensor
from merging.targeting import check_output_layer
from merging.tied import check_tied_factors, tied_pair
from registry.formats.base_check import EMBEDDING_SUFFIXES, check_against_base
from registry.errors import BadInputError, BaseMismatchError
from registry.formats.patterns import is_all_linear
from registry.formats.peft_keys import base_key_for_extra, base_weight_key
from registry.formats.safetensors_header import read_header

HEAD_KEY = "lm_head.weight"


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


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether ``config`` (or its ``text_config``) ties the input and output embeddings."""
    given = config.get("text_config")
    text: dict[str, Any] = given if isinstance(given, dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def adapter_plan(adapter: LoraAdapter, layout: ModelLayout, config: dict[str, Any]
                 ) -> tuple[dict[str, ModuleInfo], dict[str, str]]:
    """Base key -> LoRA module, base key -> replacing adapter tensor (shapes checked).

    Raises:
        BaseMismatchError: An adapter tensor has no base tensor, or shapes disagree.
        BadInputError: A tensor is both LoRA-adapted and replaced.
    """
    header = read_header(adapter.weights_path)
    check_against_base({n: i.keys for n, i in adapter.infos.items()}, adapter.extras, header,
                       adapter.config, layout.model_dir)
    if is_all_linear(adapter.config.get("target_modules")):  # the skeleton only when needed
        from registry.formats.architecture import output_layer_name

        check_output_layer(adapter.path, adapter.config, adapter.infos, output_layer_name(config))
    loras = {base_weight_key(n): info for n, info in adapter.infos.items()}
    replacements: dict[str, str] = {}
    for extra in adapter.extras:
        key = base_key_for_extra(extra)
        if key not in layout.tensors and not (key == HEAD_KEY and tied_embeddings(config)):
            raise BaseMismatchError(f"adapter tensor {extra}: the base has no tensor {key!r}",
                                    fix="check that the base is the one the adapter was trained on")
        if key in loras and not extra.endswith(".base_layer.weight"):
            raise BadInputError(f"{key} is both LoRA-adapted and replaced by {extra}",
                                fix="re-save the adapter with PeftModel.save_pretrained")
        replacements[key] = extra
    return loras, replacements


def transposed_weights(config: dict[str, Any], adapter: LoraAdapter | None,
                       loras: dict[str, ModuleInfo], notes: list[str]) -> set[str]:
    """Base weight keys whose LoRA delta is transposed (``fan_in_fan_out``), PEFT's way.

    PEFT forces ``fan_in_fan_out`` on for a ``Conv1D`` and off for a ``Linear``, whatever the
    config says (it even saves ``false`` for GPT-2 adapters that also target ``lm_head``):
    a square ``q_proj`` got ``Δᵀ`` added, 0.66 relative logits off what PEFT and the gate
    compute. The base's ``Conv1D`` modules are found from its config
    (:func:`registry.formats.architecture.conv1d_weights`, a meta-device skeleton); if the
    architecture is unknown, the flag decides, as before.
    """
    if adapter is None or not loras:
        return set()
    from registry.formats.architecture import conv1d_weights

    flag = bool(adapter.config.get("fan_in_fan_out"))
    linear = {key for key, info in loras.items() if not info.embedding}
    found = conv1d_weights(config)
    if found is None:  # an architecture transformers cannot build here: the flag decides
        return linear if flag else set()
    odd = sorted(linear - found) if flag else sorted(linear & found)
    if odd:
        notes.append(f"fan_in_fan_out {'ignored' if flag else 'applied'} for {len(odd)} "
                     f"{'Linear' if flag else 'Conv1D'} module(s) ({odd[0]}, ...), as PEFT does: "
                     "Conv1D weights are transposed, Linear ones not, whatever the flag says")
    return found & linear


def plan_jobs(layout: ModelLayout, config: dict[str, Any], adapter: LoraAdapter | None
              ) -> tuple[list[Job], bool, list[str]]:
    """Jobs in base order, whether the embeddings get untied, and notes.

    Raises:
        As :func:`adapter_plan`.
    """
    loras, replacements = adapter_plan(adapter, layout, config) if adapter else ({}, {})
    notes: list[str] = []
    conv1d = transposed_weights(config, adapter, loras, notes)
    jobs: list[Job] = []
    for key, src in layout.tensors.items():
        job = Job(src, key, lora=loras.get(key), replacement=replacements.get(key))
        if job.lora is not None:
            job.kind, job.transposed = "lora", job.lora.embedding or key in conv1d
        elif job.replacement is not None:
            job.kind = "replaced"
        jobs.append(job)
    embeds = [k for k in layout.tensors if k.endswith(EMBEDDING_SUFFIXES)]
    if not (tied_embeddings(config) and len(embeds) == 1):
        return jobs, False, notes
    embed, touched = embeds[0], set(loras) | set(replacements)
    if not ({embed, HEAD_KEY} & touched):
        return jobs, False, notes
    # both sides saved: PEFT tied them (it saves only the embedding's side where it cannot,
    # e.g. GPT-2's wte, and its forward then changes the input side alone: untie below)
    if adapter is not None and adapter.config.get("ensure_weight_tying") \
            and tied_pair(adapter.config, adapter.infos) is not None:
        check_tied_factors(adapter)  # one LoRA for both sides, or no single meaning
        notes.append("tied embeddings kept: ensure_weight_tying changes both sides together")
        return jobs, False, notes
    # (a LoRA'd side's "replacement" is PEFT's saved base_layer copy, equal to the base on
    # both sides: the LoRA deltas still differ, so that tie must be undone)
    if adapter is not None and {embed, HEAD_KEY} <= set(replacements) and not (
            {embed, HEAD_KEY} & set(loras)) and torch.equal(
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
            head.kind, head.transposed = "lora", head.lora.embedding or HEAD_KEY in conv1d
        elif head.replacement is not None:
            head.kind = "replaced"
        jobs.insert(at + 1, head)
    return jobs, True, notes


def model_dtype(config: dict[str, Any], layout: ModelLayout) -> torch.dtype:
    """The model's dtype: its config's, else the most common float dtype of its tensors."""
    value = config.get("dtype") or config.get("torch_dtype")
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    floats = [t.dtype for t in layout.tensors.values() if t.dtype in ("F32", "F16", "BF16")]
    return torch_dtype(max(set(floats), key=floats.count)) if floats else torch.float32


def check_one_float_dtype(layout: ModelLayout, config: dict[str, Any],
                          quant: QuantSpec | None = None) -> None:
    """Refuse a checkpoint whose floating-point tensors are not all of one dtype, or one
    ``quant`` cannot quantize (:meth:`merging.model.bnb.QuantSpec.check_source_dtype`).

    ``from_pretrained`` casts every tensor to the model's dtype, so what PEFT's
    ``merge_and_unload`` and transformers' quantization write is in that dtype; this
    streaming rewrite keeps each tensor's own, so for a mixed checkpoint (a bfloat16 shard
    in a float32 model) neither the unload nor the byte-identical quantization would hold.

    Raises:
        BadInputError: Two floating-point dtypes (the message names a tensor of each),
            tensors in another dtype than the one ``config.json`` declares, or (with
            ``quant``) a dtype it cannot take or a missing output embedding
            (:func:`check_output_weight`).
    """
    first: dict[str, str] = {}
    for name, tensor in layout.tensors.items():
        if tensor.dtype in ("F64", "F32", "F16", "BF16") and tensor.dtype not in first:
            first[tensor.dtype] = name
    declared = config.get("dtype") or config.get("torch_dtype") or "not set"
    fix = "re-save the base in one dtype, e.g. from_pretrained(DIR, dtype=...).save_pretrained(NEW_DIR)"
    if len(first) > 1:
        shown = ", ".join(f"{dtype} ({name})" for dtype, name in first.items())
        raise BadInputError(f"{layout.model_dir}: tensors of several dtypes: {shown}; config "
                            f"dtype {declared}", fix=fix)
    # from_pretrained casts to the config's dtype: tensors in another one would be merged
    # and quantized in theirs, unlike what transformers writes (49 of 63 tensors differed)
    wanted = getattr(torch, declared, None) if isinstance(declared, str) else None
    if declared != "not set" and not (isinstance(wanted, torch.dtype) and wanted.is_floating_point):
        raise BadInputError(f"{layout.model_dir}: config.json dtype {declared!r} is not a "
                            "floating-point dtype transformers can build the model in",
                            fix='set "dtype" to the tensors\' dtype, e.g. "bfloat16"')
    if first and isinstance(wanted, torch.dtype):
        (dtype, name), = first.items()
        if torch_dtype(dtype) != wanted:
            raise BadInputError(f"{layout.model_dir}: config.json says dtype {declared} but the "
                                f"tensors are {dtype} ({name}); from_pretrained would cast them",
                                fix=fix)
    if quant is not None:
        quant.check_source_dtype(next(iter(first), None))
        check_output_weight(layout, config)


def check_output_weight(layout: ModelLayout, config: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks its untied output embedding (``lm_head.weight``):
    transformers gives it random values on every load, and the quantized model would be
    published with them (the drift probe only noted "skipped").

    Raises:
        BadInputError: The model keeps ``lm_head`` apart and the checkpoint has none.
    """
    from registry.formats.architecture import untied_output_weight

    key = untied_output_weight(config)
    if key is not None and key not in layout.tensors:
        raise BadInputError(f"{layout.model_dir}: the checkpoint has no {key}, which this model "
                            "keeps apart from its input embedding (transformers would give it "
                            "random values)", fix="quantize a complete checkpoint, e.g. the "
                            "directory save_pretrained wrote")


def planned_tensors(job: Job, spec: QuantSpec | None) -> list[OutTensor]:
    """The output tensors ``job`` writes (several for a quantized weight)."""
    if job.quant and spec is not None:
        return planned_outputs(job.out_name, job.src.shape, spec)
    return [OutTensor(job.out_name, job.src.dtype, job.src.shape, job.src.info.nbytes)]
