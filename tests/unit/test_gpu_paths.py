"""The device paths on CUDA against the CPU: exact where the arithmetic is exact,
within documented tolerances elsewhere, and bit for bit reproducible on one device.

Skipped without a CUDA device (the CPU behaviour is covered by test_kselect,
test_lowrank, test_device_trim and test_merge_device). ``ADAPTERKIT_TEST_DEVICE=cpu``
runs the same bodies with the CPU as "the other device" (a dry run of the test code
itself: every comparison then holds exactly).

Tolerances (what differs between devices, and why):

* radix-select thresholds and keep masks: none (integer counting on the same bits);
* merged dense deltas at ``rank="full"``: cuBLAS and the CPU's BLAS round the
  ``B @ A`` products differently in the last bits, which can move an entry lying
  within that rounding of the trim threshold across it; DARE/DELLA masks are drawn
  on the CPU generator on both, so they agree. Bound: relative Frobenius difference
  ``<= 1e-3`` and at most ``1e-4`` of the entries differing by more than ``1e-5``
  relative to the largest entry;
* factors at the default rank: the randomized SVD's sketch is drawn from a CUDA
  generator on CUDA (a different sequence than the CPU's), so the factors differ;
  the truncation errors agree within 2% (relative) + 1e-6;
* bitsandbytes: the streamed output equals transformers' own route on the same
  device byte for byte; CPU and CUDA kernels are not compared here (bench_gpu.py
  reports how often they differ).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from merging.lora import kselect
from merging.lora.device_trim import merge_group
from merging.lora.engine import merge_adapters
from merging.lora.kselect import keep_mask, kth_largest_magnitudes
from merging.lora.lowrank import lowrank_factors
from merging.lora.methods import MergeParams, ModuleInput
from tests.support.merge import random_adapter

OTHER = os.environ.get("ADAPTERKIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(OTHER == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
SHAPES = {f"model.layers.{i}.{name}": shape for i in range(2)
          for name, shape in [("self_attn.q_proj", (256, 256)), ("mlp.up_proj", (1100, 1000))]}
FULL_RANK_RTOL = 1e-3
FLIPPED_FRACTION = 1e-4
ERROR_RTOL = 0.02


def test_thresholds_and_masks_equal_the_cpu_bit_for_bit() -> None:
    x = torch.randn(4, 3000, 700, generator=torch.Generator().manual_seed(0))
    x[1, :10] = 0.0
    x[2] = x[2].round()  # many ties
    ks = [1, 1_050_000, 2_099_999, 700_000]
    cpu = kth_largest_magnitudes(x, ks)
    gpu = kth_largest_magnitudes(x.to(OTHER), ks)
    assert gpu.device.type == OTHER
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
    assert torch.equal(keep_mask(x.to(OTHER), gpu).cpu(), keep_mask(x, cpu))


def test_misled_brackets_fall_back_to_radix_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kselect, "SAMPLE_SIZE", 256)
    monkeypatch.setattr(kselect, "SAMPLE_MARGIN", 64)
    x = torch.randn(3, 70_000, generator=torch.Generator().manual_seed(5))
    x[1, kselect.sample_positions(70_000, 256, x.device)] = 1e6  # row 1's bracket misses
    x[2] = x[2].round()
    bits, ks = kselect.magnitude_bits(x), torch.tensor([35_000, 35_000, 69_999])
    on_device = kselect.select_with_bracket(bits.to(OTHER), ks.to(OTHER))
    assert torch.equal(on_device.cpu(), kselect.radix_kth_largest_bits(bits, ks))


def test_lowrank_is_repeatable_and_leaves_the_cuda_rng_alone() -> None:
    D = torch.randn(3, 1100, 1000, generator=torch.Generator().manual_seed(1)).to(OTHER)
    rng_state = torch.cuda.get_rng_state if OTHER == "cuda" else torch.get_rng_state
    state = rng_state()
    first = lowrank_factors(D, 8, seed=2, modules=["a", "b", "c"])
    second = lowrank_factors(D, 8, seed=2, modules=["a", "b", "c"])
    assert torch.equal(rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].device.type == OTHER


def test_ties_group_on_cuda_matches_the_cpu_on_exact_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    group = [[ModuleInput(index=i, B=torch.randint(-3, 4, (500, 4), generator=gen).float(),
                          A=torch.randint(-3, 4, (4, 300), generator=gen).float(), weight=w)
              for i, w in enumerate([0.6, 0.4])] for _ in range(2)]
    params = MergeParams(density=0.4)
    cpu = merge_group(group, params, elect=True, device="cpu")
    gpu = merge_group(group, params, elect=True, device=OTHER)
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(merge_group(group, params, elect=True, device=OTHER), gpu)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "breadcrumbs_ties", "breadcrumbs"])
def test_grouped_forms_on_cuda_match_the_cpu_on_exact_inputs(method: str) -> None:
    """DARE's masks come from the CPU generators on both; Breadcrumbs' band edges are
    radix selects: on exact products the device's group equals the CPU's bit for bit."""
    from merging.lora.methods import ModuleContext, get_method

    spec = get_method(method)
    assert spec.grouped is not None
    gen = torch.Generator().manual_seed(4)
    group = [[ModuleInput(index=i, B=torch.randint(-3, 4, (300, 4), generator=gen).float(),
                          A=torch.randint(-3, 4, (4, 200), generator=gen).float(), weight=w)
              for i, w in enumerate([0.6, 0.4])] for _ in range(3)]
    params = spec.resolve({"density": 0.4}, [0.6, 0.4])
    contexts = [ModuleContext(name=f"layers.{m}.q_proj", shape=(300, 200), seed=1) for m in range(3)]
    kwargs = {"elect": spec.grouped.elect, "select": spec.grouped.select, "contexts": contexts}
    cpu = merge_group(group, params, device="cpu", **kwargs)
    gpu = merge_group(group, params, device=OTHER, **kwargs)
    assert gpu.device.type == OTHER and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(merge_group(group, params, device=OTHER, **kwargs), gpu)  # DARE: kept draws


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gpu-merge")
    return [random_adapter(root / f"in{i}", SHAPES, r=8, seed=i + 1) for i in range(2)]


def products(result) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Module -> the stored factors' product ``B @ A`` (float32, CPU)."""
    out = {}
    for key, tensor in result.tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = result.tensors[f"{module}.lora_B.weight"].float() @ tensor.float()
    return out


def assert_same_tensors(left, right) -> None:  # type: ignore[no-untyped-def]
    assert list(left.tensors) == list(right.tensors)
    for key, tensor in left.tensors.items():
        assert torch.equal(tensor, right.tensors[key]), key


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.3}), ("magnitude_prune", {"density": 0.4}),
    ("dare_ties", {"density": 0.5}), ("della", {"density": 0.5}),
    ("breadcrumbs_ties", {"density": 0.4})])
def test_full_rank_merges_agree_across_devices(adapters: list[Path], method: str,
                                               params: dict) -> None:
    cpu = merge_adapters(adapters, [0.6, 0.4], method, params=params, rank="full", seed=1)
    gpu = merge_adapters(adapters, [0.6, 0.4], method, params=params, rank="full", seed=1,
                         device=OTHER)
    assert gpu.report["device"].startswith(OTHER)
    assert_same_tensors(gpu, merge_adapters(adapters, [0.6, 0.4], method, params=params,
                                            rank="full", seed=1, device=OTHER))
    for module, expected in products(cpu).items():
        got = products(gpu)[module]
        diff = (got - expected).abs()
        assert float(diff.norm() / expected.norm()) <= FULL_RANK_RTOL, module
        flipped = int((diff > 1e-5 * float(expected.abs().max())).sum())
        assert flipped <= FLIPPED_FRACTION * expected.numel() + 1, module


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties",
                                    "breadcrumbs_ties", "linear"])
def test_default_rank_errors_agree_and_repeat(adapters: list[Path], method: str) -> None:
    cpu = merge_adapters(adapters, [0.6, 0.4], method, seed=4)
    gpu = merge_adapters(adapters, [0.6, 0.4], method, seed=4, device=OTHER)
    assert_same_tensors(gpu, merge_adapters(adapters, [0.6, 0.4], method, seed=4, device=OTHER))
    assert all(t.device.type == "cpu" for t in gpu.tensors.values())
    assert {k: t.dtype for k, t in gpu.tensors.items()} == {k: t.dtype for k, t in cpu.tensors.items()}
    for module, stats in cpu.report["modules"].items():
        theirs = gpu.report["modules"][module]
        assert theirs["rank"] == stats["rank"]
        assert abs(theirs["error"] - stats["error"]) <= ERROR_RTOL * stats["error"] + 1e-6, module


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("dtype", "method", "double_quant"), [
    (torch.bfloat16, "nf4", True), (torch.float32, "fp4", False), (torch.bfloat16, "int8", False)])
def test_quantize_on_the_device_equals_transformers_there(tmp_path: Path, dtype: torch.dtype,
                                                          method: str, double_quant: bool) -> None:
    pytest.importorskip("bitsandbytes")
    from merging.model.bnb import QuantSpec
    from merging.model.quantize import quantize, quantize_with_transformers
    from tests.support.unload import make_base, state_of

    source = make_base(tmp_path / "src", dtype=dtype, seed=3)
    mine = quantize(source, method, out=tmp_path / "mine", double_quant=double_quant,
                    device=OTHER, probe=False)
    quantize_with_transformers(source, QuantSpec(method, double_quant, device=OTHER),
                               tmp_path / "theirs")
    a, b = state_of(mine.out_dir), state_of(tmp_path / "theirs")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    config = json.loads((mine.out_dir / "config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "config.json").read_text())
    config.pop("transformers_version", None), reference.pop("transformers_version", None)
    assert config == reference
    assert (mine.quantization or {}).get("device", "cpu").startswith(OTHER)


def test_device_merges_of_wide_modules_write_as_peft_directories(tmp_path: Path) -> None:
    """A wide module's factors come back from the batched device SVD as strided views;
    the merge must still write (safetensors takes contiguous tensors only) and read back."""
    from safetensors.torch import load_file

    from merging.lora.peft_output import write_peft_dir

    wide = {f"model.layers.{i}.mlp.down_proj": (300, 1100) for i in range(2)}
    paths = [random_adapter(tmp_path / f"in{i}", wide, r=8, seed=i + 5) for i in range(2)]
    for method in ("ties", "magnitude_prune", "dare_ties"):
        result = merge_adapters(paths, [0.6, 0.4], method, seed=2, device=OTHER)
        out = write_peft_dir(result, tmp_path / f"out-{method}")
        stored = load_file(str(out / "adapter_model.safetensors"))
        assert stored.keys() == result.tensors.keys()
        assert all(torch.equal(stored[k], t) for k, t in result.tensors.items())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_live_swap_on_the_device_is_the_gates_model_there(tmp_path: Path, dtype: str) -> None:
    """``merge-search --device``: the live model on the device gets host factors (a
    parent's, a merge's) and must hold exactly what the gate loads there (base + PEFT
    dir, ``merge_and_unload`` on the device)."""
    from gate.evaluate import Evaluator
    from merging.adapter import load_adapter
    from merging.lora.live import LiveLora, rank_bound
    from merging.lora.peft_output import write_peft_dir
    from tests.support.cli import build_tiny_peft

    base_dir = tmp_path / "base"
    build_tiny_peft(base_dir, tmp_path / "a", seed=1)
    build_tiny_peft(tmp_path / "base2", tmp_path / "b", seed=2)  # same base weights (seeded)
    adapters = [load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")]

    def evaluator() -> Evaluator:
        return Evaluator(base_dir, dtype=dtype, device=OTHER)

    live = LiveLora.attach(evaluator().base(), rank_bound(adapters))

    def same_weights(expected: dict[str, torch.Tensor]) -> bool:
        got = live.model.state_dict()
        return set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    live.load_adapter(adapters[0])
    assert same_weights(evaluator().with_adapter("p", tmp_path / "a").state_dict())
    result = merge_adapters(adapters, [0.7, 1.2], "ties", device=OTHER)
    live.load(result, adapters)
    merged = evaluator().with_adapter("c", write_peft_dir(result, tmp_path / "m")).state_dict()
    assert next(iter(merged.values())).device.type == OTHER
    assert same_weights(merged)
