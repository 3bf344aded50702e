"""The GPU's algorithms, run on the CPU (``batched=True``): CI has no GPU, so without
this the batched deltas, the batched randomized SVD and the host copies of their
factors would run only where a GPU is lent. They must agree with the per-module CPU
path within the tolerances ``test_gpu_paths.py`` documents for CUDA, repeat bit for
bit, and hand back factors that write (a strided factor from a wide module once did not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.lora.device_trim import merge_group, merge_modules_grouped
from merging.lora.methods import MergeParams, ModuleInput

SHAPES = {  # tall and wide above lowrank.SMALL_MATRIX (randomized SVD), small wide (exact SVD)
    **{f"layers.{i}.tall": (1100, 1000) for i in range(2)},
    **{f"layers.{i}.wide": (600, 1800) for i in range(2)},
    **{f"layers.{i}.small": (64, 256) for i in range(3)},
}
FULL_RANK_RTOL = 1e-3
ERROR_RTOL = 0.02


def inputs_for(name: str) -> list[ModuleInput]:
    """Two inputs of mixed rank (4 and 8): the batched path zero-pads to the largest."""
    rows, cols = SHAPES[name]
    gen = torch.Generator().manual_seed(sorted(SHAPES).index(name) + 1)
    return [ModuleInput(index=i, B=torch.randn(rows, r, generator=gen) / r ** 0.5,
                        A=torch.randn(r, cols, generator=gen) / cols ** 0.5, weight=w)
            for i, (r, w) in enumerate([(4, 0.6), (8, 0.4)])]


def grouped(elect: bool, batched: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, float]]:
    params = MergeParams(density=0.4, lam=1.0, weight_sum=1.0)
    out = merge_modules_grouped(SHAPES, {n: (0, 1) for n in SHAPES},
                                lambda names: [inputs_for(n) for n in names], params,
                                elect=elect, device=torch.device("cpu"), rank=8, seed=3,
                                dtype=torch.float32, batched=batched)
    return {name: (b, a, err, norm) for name, b, a, err, norm, _ in out}


@pytest.mark.parametrize("elect", [True, False], ids=["ties", "magnitude_prune"])
def test_batched_factors_agree_with_the_per_module_path_and_repeat(elect: bool) -> None:
    per_module, batched = grouped(elect, batched=False), grouped(elect, batched=True)
    again = grouped(elect, batched=True)
    assert per_module.keys() == batched.keys() == set(SHAPES)
    for name, (b, a, err, norm) in batched.items():
        assert b.shape == (SHAPES[name][0], 8) and a.shape == (8, SHAPES[name][1])
        assert torch.equal(b, again[name][0]) and torch.equal(a, again[name][1]), name
        ref_err, ref_norm = per_module[name][2], per_module[name][3]
        assert abs(norm - ref_norm) <= 1e-4 * ref_norm, name
        assert abs(err - ref_err) <= ERROR_RTOL * ref_err + 1e-6, name


def test_batched_factors_are_row_major_with_their_own_storage(tmp_path: Path) -> None:
    factors = grouped(elect=True, batched=True)
    tensors = {}
    for name, (b, a, _, _) in factors.items():
        assert b.is_contiguous() and a.is_contiguous(), name
        tensors[f"{name}.lora_B.weight"], tensors[f"{name}.lora_A.weight"] = b, a
    pointers = [t.untyped_storage().data_ptr() for t in tensors.values()]
    assert len(set(pointers)) == len(pointers)  # no factor is a view into a batch
    save_file(tensors, str(tmp_path / "f.safetensors"))
    back = load_file(str(tmp_path / "f.safetensors"))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("elect", [True, False], ids=["ties", "magnitude_prune"])
def test_batched_deltas_agree_with_the_block_products(elect: bool) -> None:
    """One bmm against the CPU's 64-row block products: float32 rounding can move an
    entry lying at the trim threshold across it, nothing more (test_gpu_paths' bound)."""
    group = [inputs_for(n) for n in ("layers.0.tall", "layers.1.tall")]
    params = MergeParams(density=0.3, lam=1.2, weight_sum=1.0)
    blocks = merge_group(group, params, elect=elect, device="cpu", batched=False)
    bmm = merge_group(group, params, elect=elect, device="cpu", batched=True)
    for m in range(len(group)):
        diff = (bmm[m] - blocks[m]).abs()
        assert float(diff.norm() / blocks[m].norm()) <= FULL_RANK_RTOL
        flipped = int((diff > 1e-5 * float(blocks[m].abs().max())).sum())
        assert flipped <= 1e-4 * blocks[m].numel() + 1
