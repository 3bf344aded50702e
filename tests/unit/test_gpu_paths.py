"""kselect, lowrank and device_trim on CUDA: same thresholds as the CPU, reproducible per device.

Skipped without a CUDA device (the CPU behaviour is covered by test_kselect,
test_lowrank and test_device_trim).
"""

from __future__ import annotations

import pytest
import torch

from merging.lora.device_trim import merge_group
from merging.lora.kselect import keep_mask, kth_largest_magnitudes
from merging.lora.lowrank import lowrank_factors
from merging.lora.methods import MergeParams, ModuleInput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_thresholds_and_masks_equal_the_cpu_bit_for_bit() -> None:
    x = torch.randn(4, 3000, 700, generator=torch.Generator().manual_seed(0))
    x[1, :10] = 0.0
    x[2] = x[2].round()  # many ties
    ks = [1, 1_050_000, 2_099_999, 700_000]
    cpu = kth_largest_magnitudes(x, ks)
    gpu = kth_largest_magnitudes(x.cuda(), ks)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
    assert torch.equal(keep_mask(x.cuda(), gpu).cpu(), keep_mask(x, cpu))


def test_lowrank_is_repeatable_and_leaves_the_cuda_rng_alone() -> None:
    D = torch.randn(3, 1100, 1000, generator=torch.Generator().manual_seed(1)).cuda()
    state = torch.cuda.get_rng_state()
    first = lowrank_factors(D, 8, seed=2, modules=["a", "b", "c"])
    second = lowrank_factors(D, 8, seed=2, modules=["a", "b", "c"])
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].device.type == "cuda"


def test_ties_group_on_cuda_matches_the_cpu_on_exact_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    group = [[ModuleInput(index=i, B=torch.randint(-3, 4, (500, 4), generator=gen).float(),
                          A=torch.randint(-3, 4, (4, 300), generator=gen).float(), weight=w)
              for i, w in enumerate([0.6, 0.4])] for _ in range(2)]
    params = MergeParams(density=0.4)
    cpu = merge_group(group, params, elect=True, device="cpu")
    gpu = merge_group(group, params, elect=True, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(merge_group(group, params, elect=True, device="cuda"), gpu)
