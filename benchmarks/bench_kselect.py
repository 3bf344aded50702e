"""CPU microbenchmark: the k-th largest magnitude of 45M entries, three ways.

45,088,768 entries = one Llama-2-7B ``gate_proj`` delta (11008 x 4096), ``k`` =
half of them (TIES density 0.5):

1. ``torch.kthvalue(|x|, n - k + 1)`` on all entries (what a naive port does);
2. :func:`merging.lora.kselect.kth_largest_magnitude` (radix select, integer counting);
3. today's :func:`merging.lora.sparsify.kth_largest` on the factors of a rank-16 delta
   (sampled bracket + ``kthvalue`` on the few bracketed entries; it also recomputes
   the delta block by block from its factors, which the other two are given).

All three must return the same float (checked). Each is timed ``--repeat`` times
(best of). On a shared machine the wall clock includes the neighbours: compare
ratios from the same run. ``--device cuda`` times 1 and 2 on a GPU (3 is CPU-only).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.lora import sparsify
from merging.lora.kselect import kth_largest_magnitude
from merging.lora.methods import ModuleContext, ModuleInput

ROWS, COLS, RANK = 11008, 4096, 16


def best(fn: Callable[[], float], repeat: int, device: torch.device) -> tuple[float, float]:
    """(best seconds, value) over ``repeat`` runs."""
    times, value = [], 0.0
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(ROWS, RANK, generator=gen) / RANK ** 0.5
    A = torch.randn(RANK, COLS, generator=gen) / COLS ** 0.5
    delta = (B @ A).to(device)
    numel, k = ROWS * COLS, ROWS * COLS // 2
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; "
          f"{numel:,} entries, k = {k:,}", flush=True)
    kth_s, kth_v = best(lambda: float(torch.kthvalue(delta.abs().reshape(-1), numel - k + 1).values),
                        args.repeat, device)
    print(f"  torch.kthvalue:        {kth_s:.3f} s", flush=True)
    radix_s, radix_v = best(lambda: float(kth_largest_magnitude(delta, k)), args.repeat, device)
    print(f"  kselect (radix):       {radix_s:.3f} s  ({kth_s / radix_s:.1f}x kthvalue)", flush=True)
    if radix_v != kth_v:
        print(f"MISMATCH: kselect {radix_v!r} != kthvalue {kth_v!r}")
        return 1
    if device.type == "cpu":
        inp = ModuleInput(index=0, B=B, A=A, weight=1.0)
        ctx = ModuleContext(name="layers.0.mlp.gate_proj", shape=(ROWS, COLS), seed=0)
        today_s, today_v = best(lambda: sparsify.kth_largest(inp, k, ctx), args.repeat, device)
        print(f"  sparsify.kth_largest:  {today_s:.3f} s  ({kth_s / today_s:.1f}x kthvalue; "
              f"from factors)", flush=True)
        if today_v != kth_v:
            print(f"MISMATCH: sparsify {today_v!r} != kthvalue {kth_v!r}")
            return 1
    print("  all results identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
