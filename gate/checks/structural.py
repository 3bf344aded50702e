"""``structural``: can this candidate be loaded and served on this base at all?

Sub-checks (each can be turned off in the policy; all problems are reported, not
just the first):

* ``finite``: every floating tensor of the candidate is finite (no NaN/inf);
* ``shapes``: for an adapter, the LoRA tensors agree with each other and with the
  config, and every adapted module's base weight exists with the shape the adapter
  needs (:func:`registry.ingest.check_adapter_tensors` /
  :func:`registry.base_check.check_against_base`);
  for a derived model, the same tensor names and shapes as the base;
* ``fingerprint`` (``match``): the base fingerprint recorded with the version equals
  the fingerprint of ``--base`` (structure always; weights too when the record has a
  weights digest). Plain directories and records without a fingerprint note it;
* ``serving``: what vLLM's LoRA loader refuses: DoRA (``use_dora``), ``lora_bias``,
  ``bias`` other than ``none``, a non-LoRA ``peft_type``, and (with ``max_rank``) any
  module rank above the limit (vLLM's ``--max-lora-rank``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gate.checks import Outcome, passed
from registry.errors import AdapterkitError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _weight_files(cand_dir: Path) -> list[Path]:
    if (cand_dir / WEIGHTS).is_file():
        return [cand_dir / WEIGHTS]
    from registry.fingerprint import model_weights

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
    from registry.base_check import check_against_base
    from registry.ingest import check_adapter_tensors
    from registry.safetensors_header import read_header

    header = read_header(cand_dir / WEIGHTS)
    modules, extras = check_adapter_tensors(header, config, cand_dir / WEIGHTS)
    check_against_base(modules, extras, header, config, base_dir)
    ranks = [header.tensors[k.a].shape[0] for k in modules.values()]
    return len(modules), max(ranks, default=0)


def _model_shapes(cand_dir: Path, base_dir: Path) -> list[str]:
    from registry.fingerprint import model_weight_shapes

    mine, base = model_weight_shapes(cand_dir), model_weight_shapes(base_dir)
    problems = [f"missing tensor {k}" for k in sorted(set(base) - set(mine))[:5]]
    problems += [f"unexpected tensor {k}" for k in sorted(set(mine) - set(base))[:5]]
    problems += [f"{k}: shape {mine[k]} but the base has {base[k]}"
                 for k in sorted(set(mine) & set(base)) if mine[k] != base[k]][:5]
    return problems


def _fingerprint(record: dict | None, base_dir: Path) -> tuple[str, str | None]:
    """(state, problem): state is match / mismatch / not recorded."""
    recorded = ((record or {}).get("base_model") or {}).get("fingerprint")
    if not isinstance(recorded, dict) or not recorded.get("struct_digest"):
        return "not recorded", None
    from registry.fingerprint import fingerprint_model

    want_weights = bool(recorded.get("weights_digest"))
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


def run(spec: Any, ctx: Any) -> Outcome:
    cand_dir, base_dir = Path(ctx.candidate.dir), Path(ctx.base_dir)
    is_adapter = (cand_dir / CONFIG).is_file()
    problems: list[str] = []
    metrics: dict[str, Any] = {"artifact": "adapter" if is_adapter else "model"}
    config: dict[str, Any] = {}
    tensor_rank = 0
    if is_adapter:
        try:
            config = json.loads((cand_dir / CONFIG).read_text(encoding="utf-8"))
            from registry.peft_keys import validate_lora_config

            validate_lora_config(config, cand_dir / CONFIG)
        except (ValueError, AdapterkitError) as err:
            problems.append(f"adapter_config.json: {getattr(err, 'message', err)}")
    if spec["finite"]:
        count, bad = nonfinite_tensors(_weight_files(cand_dir))
        metrics.update(tensors=count, nonfinite_tensors=len(bad))
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            problems.append(f"{len(bad)} tensor(s) hold NaN/inf: {shown}")
    if spec["shapes"]:
        try:
            if is_adapter:
                modules, tensor_rank = _adapter_shapes(cand_dir, base_dir, config)
                metrics.update(modules=modules, max_rank=tensor_rank)
            else:
                problems += _model_shapes(cand_dir, base_dir)
        except AdapterkitError as err:
            problems.append(err.message)
    if spec["fingerprint"] == "match":
        state, problem = _fingerprint(ctx.candidate.record, base_dir)
        metrics["fingerprint"] = state
        if problem:
            problems.append(problem)
    if spec["serving"] and is_adapter:
        problems += serving_problems(config, spec["max_rank"], tensor_rank)
    if spec["max_rank"] is not None:
        metrics["rank_limit"] = spec["max_rank"]
    ok = not problems
    return passed(ok, "tensors finite, shapes fit the base, servable" if ok else "; ".join(problems),
                  metrics, {"problems": problems})
