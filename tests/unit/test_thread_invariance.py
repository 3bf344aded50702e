"""A merge's bytes do not depend on torch's thread count (merging.threads).

MKL's SVD and QR give other last bits on 1 and 2 threads, so before this a TIES merge of
SmolLM2's adapters differed in every tensor between a 1-thread and a 2-thread run: the
same ``adapters merge`` got another digest on another machine or under OMP_NUM_THREADS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.lora.engine import merge_adapters
from merging.threads import block_map, intraop_threads, row_product, slices
from tests.support.merge import random_adapter

SHAPES = {
    "model.layers.0.self_attn.q_proj": (300, 200),  # small: merged side by side, exact SVD
    "model.layers.0.self_attn.v_proj": (96, 200),
    "model.layers.0.mlp.down_proj": (1100, 1000),  # large: row blocks, randomized SVD
    "model.layers.0.mlp.up_proj": (600, 1800),  # large and wide
}
CASES = [
    ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.02}), ("della", {"density": 0.5, "epsilon": 0.1}),
    ("linear", {}), ("ties", {"density": 0.5, "align": "knots"}),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("threads")
    return [random_adapter(root / "a", SHAPES, 8, seed=1),
            random_adapter(root / "b", SHAPES, 4, seed=2, alpha=8.0)]


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{'-'.join(p)}" for m, p in CASES])
def test_merge_bytes_and_report_are_the_same_on_1_2_and_3_threads(
        adapters: list[Path], method: str, params: dict) -> None:
    runs = []
    for threads in (1, 2, 3):
        with intraop_threads(threads):
            runs.append(merge_adapters(adapters, [0.7, 0.5], method, params=params, seed=4))
            assert torch.get_num_threads() == threads  # the caller's setting is left alone
    first = runs[0]
    for other in runs[1:]:
        assert first.tensors.keys() == other.tensors.keys()
        for key, tensor in first.tensors.items():
            assert torch.equal(tensor, other.tensors[key]), key
        assert other.report == first.report


def test_block_map_workers_run_single_threaded_ops() -> None:
    # the thread count is per thread: a worker does not inherit the caller's setting
    with intraop_threads(2):
        seen = block_map(lambda _j, _b: torch.get_num_threads(), slices(10, 2))
        assert torch.get_num_threads() == 2
    assert seen == [1] * 5


def test_row_product_is_the_product() -> None:
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(700, 90, generator=gen), torch.randn(90, 12, generator=gen)
    assert torch.allclose(row_product(X, Y), X @ Y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(row_product(X.mT, Y[:, :5].new_ones(700, 5)), X.mT @ torch.ones(700, 5),
                          rtol=1e-5, atol=1e-4)
