"""Builders shared by the merge tests: hand-made adapter directories and tiny Llamas.

``write_adapter`` writes a PEFT-format adapter directory from explicit factors with
safetensors alone (no peft import, milliseconds). :data:`MERGE_LLAMA` is the merge
tests' tiny Llama shape (saved with :func:`tests.support.tiny_llama.save_tiny_llama`)
and ``peft_adapter`` makes adapters for it with ``peft.get_peft_model``
(``init_lora_weights=False`` so B is not zero), for the tests that load results with
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

PREFIX = "base_model.model."
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(r: int, alpha: float, targets: list[str] | str, **extra: Any) -> dict[str, Any]:
    """A minimal but complete-enough ``adapter_config.json`` for a LoRA adapter."""
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "base_model_name_or_path": "tiny-llama", "inference_mode": True,
    }
    config.update(extra)
    return config


def write_adapter(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  config: dict[str, Any], extras: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``{module: (A, B)}`` (module names without ``base_model.model.``) as a PEFT dir."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for key, value in (extras or {}).items():
        tensors[key] = value.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def random_adapter(path: Path, shapes: dict[str, tuple[int, int]], r: int, *, alpha: float = 16.0,
                   seed: int = 0, dtype: torch.dtype = torch.float32,
                   **config_extra: Any) -> Path:
    """Random factors for modules ``{name: (out, in)}``; targets = the modules' last names.

    Each module's factors depend only on ``(seed, name)``, so an adapter holding a
    subset of the modules has the very same factors for them.
    """
    modules = {}
    for name, (out, inp) in shapes.items():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        a = torch.randn(r, inp, generator=gen) / inp ** 0.5
        b = torch.randn(out, r, generator=gen) / r ** 0.5
        modules[name] = (a.to(dtype), b.to(dtype))
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    return write_adapter(path, modules, lora_config(r, alpha, targets, **config_extra))


MERGE_LLAMA = {"vocab_size": 96, "intermediate_size": 48}
"""The merge tests' shape (a :func:`tests.support.tiny_llama.tiny_llama` preset)."""


def peft_adapter(base_dir: Path, out: Path, *, r: int, alpha: float, targets: list[str],
                 seed: int, **lora_kwargs: Any) -> Path:
    """Train-free adapter: peft-initialised with random (non-zero) A and B, saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make B larger so deltas matter in logits comparisons
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
            elif "modules_to_save" in name:  # a "trained" copy, different per seed
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(str(out))
    return out


def delta_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Independent reading of an adapter: module (no prefix) -> its delta (float32).

    ``s·B·A`` for linear layers, ``(s·B·A).T`` for embeddings (the weight's layout).

    Uses peft's own pattern lookup so it does not share code with merging/.
    """
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module, embedding = key[: -len(".lora_A.weight")], False
            b = tensors[f"{module}.lora_B.weight"]
        elif key.endswith(".lora_embedding_A"):
            module, embedding = key[: -len(".lora_embedding_A")], True
            b = tensors[f"{module}.lora_embedding_B"]
        else:
            continue
        name = module[len(PREFIX):]
        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
        alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
        scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
        delta = (b.double() @ a.double() * scale).float()
        out[name] = delta.T.contiguous() if embedding else delta  # weight layout
    return out


def as_inputs(deltas, weights):  # type: ignore[no-untyped-def]
    """Dense deltas as method inputs (``B = I``, ``A = delta``: ``B @ A`` is the delta)."""
    from merging.lora.methods import ModuleInput

    return [ModuleInput(index=i, B=torch.eye(d.shape[0]), A=d.clone(), weight=w)
            for i, (d, w) in enumerate(zip(deltas, weights, strict=True))]


def run(method, deltas, weights, name="m", seed=0, **given):  # type: ignore[no-untyped-def]
    """One registered method on dense deltas; the merged delta."""
    from merging.lora.methods import ModuleContext, get_method

    spec = get_method(method)
    params = spec.resolve(given, weights)
    ctx = ModuleContext(name=name, shape=tuple(deltas[0].shape), seed=seed)
    out = spec.fn(as_inputs(deltas, weights), params, ctx)
    return out if isinstance(out, torch.Tensor) else out.B @ out.A


def random_deltas(n, shape, seed):  # type: ignore[no-untyped-def]
    """``n`` seeded random dense deltas of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


# ---- hand-made adapter pairs for the engine tests (mixed ranks, a module only one has) ----

PAIR_SHAPES = {"model.layers.0.self_attn.q_proj": (40, 24), "model.layers.0.mlp.up_proj": (56, 24),
               "model.layers.1.self_attn.q_proj": (40, 24)}
PAIR_ONLY_A = "model.layers.0.mlp.up_proj"


def adapter_pair(root: Path) -> tuple[Path, Path]:
    """Two adapters under ``root``: rank 4 on :data:`PAIR_SHAPES`, rank 6 (alpha 12)
    without :data:`PAIR_ONLY_A`."""
    a = random_adapter(root / "a", PAIR_SHAPES, 4, seed=1)
    b = random_adapter(root / "b", {k: v for k, v in PAIR_SHAPES.items() if k != PAIR_ONLY_A}, 6,
                       seed=2, alpha=12)
    return a, b


def lora_product(result, name):  # type: ignore[no-untyped-def]
    """``B @ A`` of module ``name`` (no prefix) in a merge result's tensors."""
    key = f"{PREFIX}{name}"
    return result.tensors[key + ".lora_B.weight"] @ result.tensors[key + ".lora_A.weight"]


def module_deltas(path, names):  # type: ignore[no-untyped-def]
    """``{name: delta}`` of the modules among ``names`` that the adapter at ``path`` has."""
    from merging.adapter import load_adapter

    adapter = load_adapter(path)
    return {n: adapter.module(f"{PREFIX}{n}").delta() for n in names
            if f"{PREFIX}{n}" in adapter.infos}


def mergekit_merge(name, deltas, weights, **params):  # type: ignore[no-untyped-def]
    """mergekit's registered method on a zero base (so its result is the merged delta)."""
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([torch.zeros_like(deltas[0]), *deltas], base_index=0)
    ids = range(1, len(deltas) + 1)
    per_input = {k: params.pop(k) for k in ("density", "gamma", "epsilon") if k in params}
    kwargs = {"int8_mask": False, "lambda": params.pop("lam", 1.0),
              "weight": dict(zip(ids, weights, strict=True)), **{k: dict.fromkeys(ids, v) for k, v in
                                                    per_input.items()}, **params}
    return mk_registry.get(name).merge_group(group, **kwargs)


# ---- the merge CLI tests' store: three adapters over two bases ----

CLI_SHAPES = {f"model.layers.{i}.self_attn.{m}": (32, 32) for i in range(2)
              for m in ("q_proj", "v_proj")}
CLI_SHAPES["model.layers.0.self_attn.v_proj"] = (16, 32)
CLI_SHAPES["model.layers.1.self_attn.v_proj"] = (16, 32)


def merge_cli(args: list[str], capsys) -> tuple[int, dict | None, str]:  # type: ignore[no-untyped-def]
    """Run ``adapters ARGS`` in-process: (exit code, parsed stdout when ``--json``, stderr)."""
    import cli.main as cli_main
    from cli import merge_cmds

    if not any(c.name == "merge" for c in cli_main.app.registered_commands):
        merge_cmds.register(cli_main.app)  # until cli/main.py lists cli.merge_cmds
    capsys.readouterr()
    code = cli_main.main(args)
    captured = capsys.readouterr()
    data = None
    if "--json" in args and captured.out.strip():
        data = json.loads(captured.out)
    return code, data, captured.err
