"""``structural``: can this candidate be loaded and served on this base at all?

Sub-checks (each can be turned off in the policy; all problems are reported, not
just the first):

* ``finite``: every floating tensor of the candidate is finite (no NaN/inf); for a
  bitsandbytes checkpoint also every quantized weight: its quant state is well-formed,
  its scales and code books (``absmax``, ``quant_map``, ``nested_absmax``,
  ``nested_quant_map``, ``SCB``) are finite with the lengths the shape and block size
  imply, and the weight dequantized with bitsandbytes' own functions is finite
  (:mod:`gate.bnb_state`);
* ``shapes``: for an adapter, the LoRA tensors agree with each other and with the
  config, and every adapted module's base weight exists with the shape the adapter
  needs (:func:`registry.ingest.check_adapter_tensors` /
  :func:`registry.formats.base_check.check_against_base`);
  for a full (or quantized) model, every tensor the base has is there with the base's
  shape (a quantized weight by the shape its quant state records), and nothing else is,
  besides the documented quantization state of a quantized weight and an ``lm_head``
  written when the model unties embeddings the base ties;
* ``fingerprint`` (``match``): the base fingerprint recorded with the version equals
  the fingerprint of ``--base`` (structure always; weights too when the record has a
  weights digest and the version was made from the base itself -- an adapter or an
  unload; a quantization records the model it quantized). For a model, the structure
  digest of its *logical* tensors (quantization state left out, shapes as recorded)
  and config must equal the base's too, recorded or not;
* ``serving``: what vLLM's LoRA loader refuses: DoRA (``use_dora``), ``lora_bias``,
  ``bias`` other than ``none``, a non-LoRA ``peft_type``, and (with ``max_rank``) any
  module rank above the limit (vLLM's ``--max-lora-rank``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate import policy_fields as f
from gate.check_kinds import CheckParams
from gate.checks import Outcome, passed
from registry.errors import AdapterkitError
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from gate.bnb_state import QuantLayout
    from gate.context import GateContext
    from gate.policy import CheckSpec

PARAMS = CheckParams(listed=0, fields={
    "finite": (f.boolean, True), "shapes": (f.boolean, True),
    "fingerprint": (f.choice("match", "skip"), "match"),
    "serving": (f.boolean, True), "max_rank": (f.optional(f.int_at_least(1)), None),
})

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _weight_files(cand_dir: Path) -> list[Path]:
    if (cand_dir / WEIGHTS).is_file():
        return [cand_dir / WEIGHTS]
    from registry.formats.fingerprint import model_weights

    return sorted(model_weights(cand_dir).files)


def nonfinite_tensors(files: list[Path]) -> tuple[int, list[str]]:
    """(tensor count, names of floating tensors holding NaN or inf)."""
    import torch
    from safetensors import safe_open

    count, bad = 0, []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                count += 1
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    return count, bad


def _adapter_shapes(cand_dir: Path, base_dir: Path, config: dict[str, Any]) -> tuple[int, int]:
    """Validate tensors vs config and base; returns (modules, max rank)."""
    from registry.formats.base_check import check_against_base
    from registry.ingest import check_adapter_tensors
    from registry.formats.safetensors_header import read_header

    header = read_header(cand_dir / WEIGHTS)
    modules, extras = check_adapter_tensors(header, config, cand_dir / WEIGHTS)
    check_against_base(modules, extras, header, config, base_dir)
    ranks = [header.tensors[k.a].shape[0] for k in modules.values()]
    return len(modules), max(ranks, default=0)


def _model_shapes(layout: QuantLayout, base_dir: Path) -> list[str]:
    from registry.formats.fingerprint import model_config, model_weight_shapes

    mine, base = layout.logical, model_weight_shapes(base_dir)
    extra = set(mine) - set(base)
    if (model_config(base_dir) or {}).get("tie_word_embeddings", True):
        extra.discard("lm_head.weight")  # an unload that changes one side unties them
    problems = [f"missing tensor {k}" for k in sorted(set(base) - set(mine))[:5]]
    problems += [f"unexpected tensor {k}" for k in sorted(extra)[:5]]
    problems += [f"{k}: shape {mine[k]} but the base has {base[k]}"
                 for k in sorted(set(mine) & set(base))
                 if mine[k] is not None and mine[k] != base[k]][:5]  # None: malformed state
    return problems + layout.problems[:5]


UNTIED_HEAD = "lm_head.weight"
"""The tensor ``unload`` adds when it unties a tied base's embeddings."""


def logical_struct_digest(layout: QuantLayout, cand_dir: Path,
                          retied: dict[str, Any] | None = None) -> str:
    """``struct_digest`` (:mod:`registry.formats.fingerprint`) of a model's logical tensors.

    ``retied``: the base's config, for a model whose embeddings ``unload`` untied (the
    adapter changed one side): the digest is taken as if it were still tied, without
    :data:`UNTIED_HEAD` and with the base's ``tie_word_embeddings``, so that documented
    untying is not a structure change.
    """
    from registry.digests import json_digest
    from registry.formats.fingerprint import arch_fields, model_config

    config = dict(model_config(cand_dir) or {})
    logical = dict(layout.logical)
    if retied is not None:
        logical.pop(UNTIED_HEAD, None)
        config.pop("tie_word_embeddings", None)
        if "tie_word_embeddings" in retied:
            config["tie_word_embeddings"] = retied["tie_word_embeddings"]
    tensors = [[name, list(shape or ())] for name, shape in sorted(logical.items())]
    return json_digest({"v": 1, "tensors": tensors, "config": arch_fields(config)})


def _untied_from(base_dir: Path, cand_dir: Path, layout: QuantLayout) -> dict[str, Any] | None:
    """The base's config when the candidate is the base with its tied embeddings untied."""
    from registry.formats.fingerprint import model_config

    base, cand = model_config(base_dir) or {}, model_config(cand_dir) or {}
    if base.get("tie_word_embeddings") and cand.get("tie_word_embeddings") is False \
            and UNTIED_HEAD in layout.logical:
        return base
    return None


def _fingerprint(record: dict | None, base_dir: Path, *, weights: bool = True
                 ) -> tuple[str, str | None]:
    """(state, problem): state is match / mismatch / not recorded."""
    recorded = ((record or {}).get("base_model") or {}).get("fingerprint")
    if not isinstance(recorded, dict) or not recorded.get("struct_digest"):
        return "not recorded", None
    from registry.formats.fingerprint import fingerprint_model

    want_weights = weights and bool(recorded.get("weights_digest"))
    actual = fingerprint_model(base_dir, weights=want_weights)
    if actual.struct_digest != recorded["struct_digest"]:
        return "mismatch", ("base structure differs from the one recorded with the candidate "
                            f"({actual.struct_digest[:19]} vs {recorded['struct_digest'][:19]})")
    if want_weights and actual.weights_digest != recorded["weights_digest"]:
        return "mismatch", "base weights differ from the ones recorded with the candidate"
    return "match", None


def serving_problems(config: dict[str, Any], max_rank: int | None, tensor_rank: int) -> list[str]:
    """What vLLM would refuse in this adapter config."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not servable by vLLM")
    if config.get("lora_bias"):
        problems.append("lora_bias is not servable by vLLM")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} (vLLM needs bias='none')")
    if max_rank is not None:
        ranks = [config.get("r") or 0, tensor_rank, *(config.get("rank_pattern") or {}).values()]
        if max(ranks) > max_rank:
            problems.append(f"rank {max(ranks)} exceeds max_rank {max_rank}")
    return problems


def _model_problems(spec: Any, ctx: Any, metrics: dict[str, Any]) -> list[str]:
    """The ``finite`` (quantized part), ``shapes`` and ``fingerprint`` checks of a model."""
    from gate.bnb_state import check_quantized, read_layout
    from registry.formats.fingerprint import fingerprint_model

    cand_dir, base_dir = Path(ctx.candidate.dir), Path(ctx.base_dir)
    layout = read_layout(cand_dir)
    problems: list[str] = []
    metrics["quantized_weights"] = len(layout.four_bit) + len(layout.int8)
    if spec["finite"] and layout.quantized:
        checked, found = check_quantized(cand_dir, layout)
        metrics["quant_problems"] = len(found)
        problems += found[:5] + ([f"(+{len(found) - 5} more)"] if len(found) > 5 else [])
    if spec["shapes"]:
        problems += _model_shapes(layout, base_dir)
    if spec["fingerprint"] == "match":
        method = ((ctx.candidate.lineage or {}).get("recipe") or {}).get("method")
        state, problem = _fingerprint(ctx.candidate.record, base_dir, weights=method != "quantize")
        metrics["fingerprint"] = state
        if problem:
            problems.append(problem)
        base_struct = fingerprint_model(base_dir, weights=False).struct_digest
        same = logical_struct_digest(layout, cand_dir) == base_struct
        retied = None if same else _untied_from(base_dir, cand_dir, layout)
        if retied is not None and logical_struct_digest(layout, cand_dir, retied) == base_struct:
            same = True  # unload untied the embeddings (documented), nothing else differs
        metrics["structure"] = ("match (embeddings untied)" if retied is not None and same
                                else "match" if same else "mismatch")
        if not same and not problems:
            problems.append("the model's structure (tensor names, shapes, architecture) "
                            "differs from the base's")
    return list(dict.fromkeys(problems))  # a malformed state is seen by layout and check


def run(spec: CheckSpec, ctx: GateContext) -> Outcome:
    cand_dir, base_dir = Path(ctx.candidate.dir), Path(ctx.base_dir)
    is_adapter = (cand_dir / CONFIG).is_file()
    problems: list[str] = []
    metrics: dict[str, Any] = {"artifact": "adapter" if is_adapter else "model"}
    config: dict[str, Any] = {}
    tensor_rank = 0
    if is_adapter:
        try:
            config = loads_json((cand_dir / CONFIG).read_text(encoding="utf-8"))
            from registry.formats.peft_keys import validate_lora_config

            validate_lora_config(config, cand_dir / CONFIG)
        except (ValueError, AdapterkitError) as err:
            problems.append(f"adapter_config.json: {getattr(err, 'message', err)}")
    if spec["finite"]:
        count, bad = nonfinite_tensors(_weight_files(cand_dir))
        metrics.update(tensors=count, nonfinite_tensors=len(bad))
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            problems.append(f"{len(bad)} tensor(s) hold NaN/inf: {shown}")
    if is_adapter:
        if spec["shapes"]:
            try:
                modules, tensor_rank = _adapter_shapes(cand_dir, base_dir, config)
                metrics.update(modules=modules, max_rank=tensor_rank)
            except AdapterkitError as err:
                problems.append(err.message)
        if spec["fingerprint"] == "match":
            state, problem = _fingerprint(ctx.candidate.record, base_dir)
            metrics["fingerprint"] = state
            if problem:
                problems.append(problem)
    else:
        try:
            problems += _model_problems(spec, ctx, metrics)
        except AdapterkitError as err:
            problems.append(err.message)
    if spec["serving"] and is_adapter:
        problems += serving_problems(config, spec["max_rank"], tensor_rank)
    if spec["max_rank"] is not None:
        metrics["rank_limit"] = spec["max_rank"]
    ok = not problems
    what = "servable" if is_adapter else ("quantization state well-formed" if
                                          metrics.get("quantized_weights") else "complete")
    return passed(ok, f"tensors finite, shapes fit the base, {what}" if ok else "; ".join(problems),
                  metrics, {"problems": problems})
