"""Merge benchmark: two r=16 adapters with Llama-2-7B shapes, random factors, no base.

Measured in one run (so the ratios compare like with like on this machine):

1. **Exact linear, all 32 layers** through ``merge_adapters`` (reads both adapters
   from disk, stacks the scaled factors, re-factors each module exactly by QR +
   small SVD, measures the error). Target: < 5 s.
2. **PEFT ``add_weighted_adapter(..., "ties_svd")`` on a subset**: one module per
   shape class of layer 0 (default ``q_proj`` 4096x4096 and ``gate_proj``
   11008x4096), each in a one-Linear model whose base weight is allocated on the
   meta device and materialized uninitialised (PEFT's ties_svd never reads it).
   A layer is extrapolated as ``4·t(q_proj) + 3·t(gate_proj)`` (k, v, o share
   q's shape; up and down share gate's size, down transposed), and 32 layers as
   32x that.
3. **Our TIES re-factored to rank 16** on the same modules (per-module times from
   the progress callback) and on ``--layers`` full layers (default 2),
   extrapolated to 32 layers.
4. **Rank-16 error**: for each subset module, the relative Frobenius error of our
   factors and of PEFT's (an exact ``torch.linalg.svd`` truncated to rank 16)
   against the same TIES delta computed by ``peft.utils.merge_utils.ties``; the
   ratio ours/exact must be <= 1.05.

Wall and CPU (``time.process_time``, all threads) seconds are both printed: on a
shared machine the wall clock measures the neighbours too.

Default run: ~3-4 minutes on 2 idle cores. ``--layers 32`` times our TIES on every
layer; ``--peft-modules q_proj`` times PEFT on q_proj only; ``--peft-modules none``
skips PEFT (no ratio then).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # module -> (out, in) of Llama-2-7B
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096), "mlp.down_proj": (4096, 11008),
}
PER_LAYER = {"self_attn.q_proj": 4, "mlp.gate_proj": 3}  # modules of each cost class per layer
RANK, ALPHA, LAYERS, WEIGHTS, DENSITY = 16, 32, 32, [0.6, 0.4], 0.5


def factors(seed: int, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random (A, B) for one module of one adapter."""
    out, inp = SHAPES[module]
    gen = torch.Generator().manual_seed(seed * 100_003 + layer * 101 + sorted(SHAPES).index(module))
    a = torch.randn(RANK, inp, generator=gen) / inp ** 0.5
    b = torch.randn(out, RANK, generator=gen) / RANK ** 0.5
    return a, b


def write_adapter(path: Path, seed: int, layers: range, modules: list[str]) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    tensors = {}
    for layer in layers:
        for module in modules:
            a, b = factors(seed, layer, module)
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
              "target_modules": sorted({m.split(".")[1] for m in modules}), "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def timed_merge(paths: list[Path], method: str, **kwargs):  # type: ignore[no-untyped-def]
    from merging.lora.engine import merge_adapters

    stamps: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    result = merge_adapters(paths, WEIGHTS, method, progress=lambda _n: stamps.append(time.perf_counter()),
                            **kwargs)
    total = time.perf_counter() - start
    # consecutive pairs: the second list is one shorter
    per_module = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    return result, total, per_module, time.process_time() - cpu


def peft_ties_svd(module: str) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Time PEFT's ties_svd on one module: (wall s, CPU s, PEFT's delta, true TIES delta)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import merge_utils

    out, inp = SHAPES[module]

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(inp, out, bias=False, device="meta")

    model = One().to_empty(device="cpu")  # uninitialised; ties_svd never reads it
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config, adapter_name="first")
    peft_model.add_adapter("second", config)
    layer = peft_model.base_model.model.proj
    deltas = []
    with torch.no_grad():
        for name, seed in (("first", 1), ("second", 2)):
            a, b = factors(seed, 0, module)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
            deltas.append(layer.get_delta_weight(name).clone())
        start, cpu = time.perf_counter(), time.process_time()
        peft_model.add_weighted_adapter(["first", "second"], WEIGHTS, "m", combination_type="ties_svd",
                                        density=DENSITY)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        merged = layer.get_delta_weight("m").clone()
        reference = merge_utils.ties(deltas, torch.tensor(WEIGHTS), DENSITY, "total")
    return seconds, cpu, merged, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="layers for our TIES timing (max 32)")
    parser.add_argument("--linear-layers", type=int, default=32, help="layers for exact linear")
    parser.add_argument("--peft-modules", default="q_proj,gate_proj",
                        help="PEFT ties_svd subset: q_proj,gate_proj | q_proj | gate_proj | none")
    args = parser.parse_args()
    peft_subset = [m for m in (f"self_attn.{n}" if n == "q_proj" else f"mlp.{n}"
                               for n in args.peft_modules.split(",") if n != "none")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 2 adapters, r={RANK}, "
          f"Llama-2-7B shapes, weights {WEIGHTS}, density {DENSITY}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        full = [write_adapter(work / f"full-{s}", s, range(args.linear_layers), list(SHAPES))
                for s in (1, 2)]
        print(f"wrote two {args.linear_layers}-layer adapters in {time.perf_counter() - t0:.1f} s",
              flush=True)

        res, linear_s, _, linear_cpu = timed_merge(full, "linear")
        print(f"\n[exact linear] {args.linear_layers} layers ({len(res.report['modules'])} modules): "
              f"{linear_s:.2f} s wall, {linear_cpu:.2f} s CPU (target < 5 s), "
              f"overall error {res.report['error']:.1e}, "
              f"output rank {res.config['r']}", flush=True)
        del res

        ours_layers = [write_adapter(work / f"layers-{s}", s, range(args.layers), list(SHAPES))
                       for s in (1, 2)]
        res, ties_s, _, ties_cpu = timed_merge(ours_layers, "ties", params={"density": DENSITY},
                                               rank=RANK)
        ours_layer, ours_layer_cpu = ties_s / args.layers, ties_cpu / args.layers
        print(f"[our TIES -> rank {RANK}] {args.layers} layer(s): {ties_s:.1f} s wall "
              f"({ties_cpu:.1f} s CPU) = {ours_layer:.1f} s/layer -> 32 layers ~ {32 * ours_layer:.0f} s"
              f" (measured {args.layers}, x{32 / args.layers:g}); overall error "
              f"{res.report['error']:.4f}", flush=True)
        del res
        if not peft_subset:
            return

        subset = [write_adapter(work / f"subset-{s}", s, range(1), peft_subset) for s in (1, 2)]
        res, _, per_module, _ = timed_merge(subset, "ties", params={"density": DENSITY}, rank=RANK)
        names = sorted(res.report["modules"])
        ours_t = {n.split("layers.0.")[1]: t for n, t in zip(names, per_module, strict=True)}
        print("\n[subset, layer 0] ours: " + ", ".join(f"{m} {t:.2f} s" for m, t in ours_t.items()),
              flush=True)
        peft_t, peft_cpu, ratios = {}, {}, {}
        for module in peft_subset:
            seconds, cpu, peft_delta, reference = peft_ties_svd(module)
            peft_t[module], peft_cpu[module] = seconds, cpu
            key = f"base_model.model.model.layers.0.{module}"
            ours_delta = res.tensors[key + ".lora_B.weight"].float() @ res.tensors[key + ".lora_A.weight"].float()
            norm = torch.linalg.norm(reference)
            exact_err = float(torch.linalg.norm(reference - peft_delta) / norm)
            ours_err = float(torch.linalg.norm(reference - ours_delta) / norm)
            ratios[module] = ours_err / exact_err
            print(f"  PEFT ties_svd {module} {SHAPES[module][0]}x{SHAPES[module][1]}: {seconds:.1f} s "
                  f"wall ({cpu:.1f} s CPU) "
                  f"(ours {ours_t[module]:.2f} s, {seconds / ours_t[module]:.0f}x faster); "
                  f"rank-16 error ours {ours_err:.4f} vs exact SVD {exact_err:.4f}: ratio "
                  f"{ratios[module]:.4f} (target <= 1.05)", flush=True)
            del peft_delta, reference, ours_delta
        if set(peft_t) == set(PER_LAYER):
            peft_layer = sum(PER_LAYER[m] * peft_t[m] for m in PER_LAYER)
            peft_layer_cpu = sum(PER_LAYER[m] * peft_cpu[m] for m in PER_LAYER)
            how = "4 x t(q_proj) + 3 x t(gate_proj)"
        else:
            module = next(iter(peft_t))
            peft_layer, peft_layer_cpu = 7 * peft_t[module], 7 * peft_cpu[module]
            how = f"7 x t({module}); only {module} was timed"
        print(f"\nPEFT ties_svd per layer (extrapolated {how}): {peft_layer:.0f} s wall "
              f"({peft_layer_cpu:.0f} s CPU) -> 32 layers ~ {32 * peft_layer / 3600:.1f} h")
        print(f"our TIES per layer (measured on {args.layers} layer(s)): {ours_layer:.1f} s wall "
              f"({ours_layer_cpu:.1f} s CPU)")
        print(f"RATIO speed PEFT/ours: {peft_layer / ours_layer:.1f}x wall, "
              f"{peft_layer_cpu / ours_layer_cpu:.1f}x CPU (target >= 30x)")
        print(f"RATIO rank-16 error ours/exact: max {max(ratios.values()):.4f} (target <= 1.05)")
        print(f"RATIO exact linear {args.linear_layers} layers: {linear_s:.2f} s wall, "
              f"{linear_cpu:.2f} s CPU (target < 5 s)")


if __name__ == "__main__":
    main()
