"""Part (d) of ``bench_gpu.py``: the demo's gate policy on a 7B-shaped model, on the device.

Issue 16 asks that a 7B candidate be gated "in minutes, not hours". No 7B checkpoint can
reach a GPU machine (only a few MiB travel there), so the model is built there:

* **base**: Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 layers, 32 heads)
  with the tokenizer of ``--gate-base`` (SmolLM2's: vocabulary 49152, so about 7.0 B
  parameters), transformers' own initialisation under ``torch.manual_seed(0)``, drawn
  on the device in bfloat16 and written as safetensors shards (the write is not timed);
* **candidate**: the library's linear merge of two random r=16 LoRA adapters on
  q/k/v/o (the merge's parents, each with weight 0.5), written as a PEFT directory;
* **policy**: the demo's (:func:`demo.write_policy`: structural, merge equivalence,
  perplexity, retention on both parents' sets, drift, generation) with
  ``dtype: bfloat16``, as a 7B model would be gated.

Printed: the gate's wall time (the target: minutes), each check's time, how many
model loads the gate made and their total time (:meth:`gate.evaluate.Evaluator._load_dir`
is timed from outside), and the peak GPU memory. A random model rarely emits EOS, so
every generation runs to its token limit: an upper bound on a trained model's time. The
verdicts mean nothing (random weights). There is no CPU anchor: the CPU gate of the same
model would take hours. An untimed warm-up gate of a 2-layer model runs first, so the
clock does not include imports and the CUDA context. ``--small`` builds 1/16 of the
shapes with 2 layers (a CPU smoke run).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
            "tie_word_embeddings": False, "max_position_embeddings": 4096}


def shaped_config(tokenizer_dir: Path, *, small: bool) -> dict:
    """``tokenizer_dir``'s ``config.json`` with Llama-2-7B's shapes (1/16 and 2 layers if ``small``)."""
    config = json.loads((tokenizer_dir / "config.json").read_text())
    config.update(SHAPE_7B)
    if small:
        config.update(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    config["dtype"] = "bfloat16"
    return config


def build_model(tokenizer_dir: Path, out: Path, device: torch.device, *, small: bool) -> tuple[Path, float]:
    """A seeded random bfloat16 model of :func:`shaped_config` in ``out``; returns (dir, billions of params)."""
    from random_base import TOKENIZER_FILES
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shaped_config(tokenizer_dir, small=small))
    torch.manual_seed(0)
    with torch.device(device):  # drawing 7 B values on the host would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, params


def random_lora(config: dict, out: Path, seed: int) -> Path:
    """A PEFT LoRA directory (r=16 on q/k/v/o of every layer) with small seeded random factors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // heads)
    outs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in LORA_TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            ins = hidden if target != "o_proj" else heads * config.get("head_dim", hidden // heads)
            tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, ins, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(outs[target], LORA_RANK, generator=gen) * 0.02
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
        "target_modules": list(LORA_TARGETS), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": "llama-2-7b-shaped"}))
    return out


@contextmanager
def timed_loads() -> Iterator[list[float]]:
    """Record the seconds of every model load the gate makes (``Evaluator._load_dir``)."""
    from gate.evaluate import Evaluator

    original = Evaluator._load_dir
    seconds: list[float] = []

    def load(self: Evaluator, model_dir: Path):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original(self, model_dir)
        finally:
            seconds.append(time.perf_counter() - start)

    Evaluator._load_dir = load  # type: ignore[method-assign]
    try:
        yield seconds
    finally:
        Evaluator._load_dir = original  # type: ignore[method-assign]


def gate_7b_timings(device: torch.device, *, small: bool, base_dir: Path | None) -> None:
    """Build the 7B-shaped world, gate it once on ``device``, print the timings."""
    sys.path.insert(0, str(EXAMPLES))
    import demo  # type: ignore[import-not-found]
    from bench_gpu_gate import smoke_policy

    from gate.context import Parent
    from gate.runner import run_gate
    from merging.lora.engine import merge_adapters
    from merging.lora.peft_output import write_peft_dir

    tokenizer_dir = base_dir or ROOT / ".adapters-demo" / "work" / "base"
    if not (tokenizer_dir / "config.json").is_file():
        print(f"  skipped: {tokenizer_dir} has no config.json (pass --gate-base DIR: a SmolLM2 "
              "config + tokenizer)", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-gate7b-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        base, params = build_model(tokenizer_dir, work / "base", device, small=small)
        print(f"  base: {params:.2f} B parameters, bfloat16, random (built and written in "
              f"{time.perf_counter() - start:.1f} s, not timed)", flush=True)
        config = json.loads((base / "config.json").read_text())
        with open(work / "data.log", "w") as log, redirect_stdout(log):
            demo.make_data(work)
        policy = demo.write_policy(work)
        policy.write_text(policy.read_text().replace("dtype: float32", "dtype: bfloat16"))
        parents = [Parent(name=demo.NAMES[task], dir=random_lora(config, work / f"lora-{task}", seed),
                          weight=0.5)
                   for seed, task in enumerate((demo.TASK_A, demo.TASK_B), start=1)]
        candidate = write_peft_dir(merge_adapters([p.dir for p in parents], [0.5, 0.5], "linear"),
                                   work / "candidate")
        warm = build_model(tokenizer_dir, work / "warm", device, small=True)[0]
        warm_lora = random_lora(json.loads((warm / "config.json").read_text()), work / "warm-lora", 9)
        run_gate(warm_lora, warm, smoke_policy(policy), parents=[], method="linear", parameters={},
                 record=False, device=str(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with timed_loads() as loads:
            start = time.perf_counter()
            result = run_gate(candidate, base, policy, parents=parents, method="linear",
                              parameters={}, record=False, device=str(device))
            total = time.perf_counter() - start
    checks = ", ".join(f"{c.kind} {c.status} {c.duration_s:.1f} s" for c in result.checks)
    peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda" else "")
    print(f"  gate on {device}: {total:.1f} s ({total / 60:.1f} min; target: minutes) "
          f"[{'PASS' if result.passed else 'FAIL'}: {checks}]", flush=True)
    print(f"  model loads: {len(loads)} taking {sum(loads):.1f} s "
          f"({', '.join(f'{s:.1f}' for s in loads)}){peak}", flush=True)
