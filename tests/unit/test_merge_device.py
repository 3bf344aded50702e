"""merge_adapters(device=...): the device code paths, run on the CPU.

The grouped path (same-shaped modules merged together, radix-select thresholds,
factors per group) must equal the per-module path bit for bit on the CPU, so a CPU
merge's digest does not depend on which path ran; ``device="cpu"`` must equal the
default; an unusable device is a BadInputError (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.devices import resolve_device
from merging.lora import device_trim
from merging.lora.engine import merge_adapters
from registry.errors import BadInputError, MergeRangeError
from tests.support.merge import random_adapter

# Two layers of three shapes (some above the 2^20-entry randomized-SVD threshold),
# plus a module only the first adapter has, so groups differ in their inputs.
SHAPES = {f"model.layers.{i}.{name}": shape for i in range(2)
          for name, shape in [("self_attn.q_proj", (96, 96)), ("mlp.up_proj", (1100, 1000)),
                              ("mlp.down_proj", (64, 160))]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("device-merge")
    first = random_adapter(root / "a", {**SHAPES, "model.layers.0.self_attn.v_proj": (96, 96)},
                           r=8, seed=1)
    second = random_adapter(root / "b", SHAPES, r=4, seed=2)
    third = random_adapter(root / "c", SHAPES, r=8, seed=3, dtype=torch.bfloat16)
    return [first, second, third]


def assert_same_result(left, right) -> None:  # type: ignore[no-untyped-def]
    assert list(left.tensors) == list(right.tensors)
    for key, tensor in left.tensors.items():
        assert tensor.device.type == "cpu"
        assert tensor.dtype == right.tensors[key].dtype
        assert torch.equal(tensor, right.tensors[key]), key
    assert left.report["modules"] == right.report["modules"]
    assert left.report["error"] == right.report["error"]
    assert left.config == right.config


@pytest.mark.parametrize(("method", "params", "rank"), [
    ("ties", {"density": 0.3}, None),
    ("ties", {"density": 0.5, "sign_election": "mergekit", "lambda": 1.3}, 6),
    ("ties", {"density": 0.4, "sign_election": "frequency"}, None),
    ("magnitude_prune", {"density": 0.35, "normalize": True}, None),
    ("magnitude_prune", {"density": 1.0}, 3),
    ("dare_ties", {"density": 0.4}, None),
    ("dare_ties", {"density": 0.6, "sign_election": "mergekit"}, 5),
    ("dare_linear", {"density": 0.5, "normalize": True, "lambda": 0.9}, None),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}, None),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.0, "normalize": True}, 4),
    ("breadcrumbs", {"density": 0.7, "gamma": 0.5}, None),  # density + gamma > 1: fewer outliers
])
def test_grouped_path_is_bit_for_bit_the_per_module_path(
        adapters: list[Path], method: str, params: dict, rank: int | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [0.6, 0.3, 0.4]
    per_module = merge_adapters(adapters, weights, method, params=params, rank=rank, seed=5)
    groups: list[int] = []
    real = device_trim.merge_group

    def spy(group, *args, **kwargs):  # type: ignore[no-untyped-def]
        groups.append(len(group))
        return real(group, *args, **kwargs)

    monkeypatch.setattr(device_trim, "merge_group", spy)
    calls: list[int] = []
    grouped = merge_adapters(adapters, weights, method, params=params, rank=rank, seed=5,
                             device="cpu", group_modules=True, progress=calls.append)
    assert_same_result(grouped, per_module)
    assert sum(calls) == len(per_module.report["modules"]) == len(SHAPES) + 1
    assert sum(groups) == len(SHAPES) + 1 and len(groups) == 4  # 3 shapes, v_proj apart
    assert grouped.report["device"] == "cpu"


@pytest.mark.parametrize(("method", "params", "weight", "dtype"), [
    ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.0}, 5e37, torch.float32),
    ("ties", {"density": 0.5}, 5e37, torch.float32),
    ("dare_ties", {"density": 0.5}, 1e9, torch.float16),
])
def test_grouped_path_refuses_factors_that_overflow_like_the_per_module_path(
        tmp_path: Path, method: str, params: dict, weight: float, dtype: torch.dtype) -> None:
    """Found by a QA pass: the grouped path checked the float32 merged delta but not the
    factors cast to the output dtype, and returned NaN/inf factors (report error nan)
    where the per-module path refuses the merge."""
    shapes = {"model.layers.0.self_attn.q_proj": (32, 32)}
    paths = [random_adapter(tmp_path / f"in{s}", shapes, r=4, seed=s, dtype=dtype) for s in (1, 2)]
    for group in (False, True):
        with pytest.raises(MergeRangeError, match="merged factors do not fit"):
            merge_adapters(paths, [weight, weight], method, params=params, group_modules=group)


def test_an_overflowing_group_names_only_the_modules_that_overflow(tmp_path: Path) -> None:
    shapes = {f"model.layers.0.self_attn.{m}_proj": (32, 32) for m in ("q", "v")}
    paths = [random_adapter(tmp_path / f"in{s}", shapes, r=4, seed=s) for s in (1, 2)]
    for path in paths:  # v_proj alone is scaled to overflow once weighted
        tensors = load_file(str(path / "adapter_model.safetensors"))
        key = next(k for k in tensors if "v_proj.lora_B" in k)
        tensors[key] = tensors[key] * 1e35
        save_file(tensors, str(path / "adapter_model.safetensors"))
    for group in (False, True):
        with pytest.raises(MergeRangeError, match="overflows float32") as err:
            merge_adapters(paths, [1e3, 1e3], "ties", params={"density": 1.0}, group_modules=group)
        assert "v_proj" in str(err.value) and "q_proj" not in str(err.value)


def test_methods_without_a_grouped_form_merge_module_by_module(
        adapters: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """DELLA ranks per row and KnOTS merges rank-sized coefficients: asked to group, they
    still take the per-module path, with the same result."""
    monkeypatch.setattr(device_trim, "merge_group", lambda *a, **k: pytest.fail("grouped"))
    for method, params in (("della", {"density": 0.5}), ("ties", {"align": "knots"})):
        per_module = merge_adapters(adapters[:2], [0.5, 0.5], method, params=params, seed=1)
        asked = merge_adapters(adapters[:2], [0.5, 0.5], method, params=params, seed=1,
                               group_modules=True)
        assert_same_result(asked, per_module)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "linear"])
def test_device_cpu_is_the_default(adapters: list[Path], method: str) -> None:
    default = merge_adapters(adapters[:2], [0.5, 0.5], method, seed=2)
    explicit = merge_adapters(adapters[:2], [0.5, 0.5], method, seed=2, device="cpu")
    assert_same_result(explicit, default)


def test_auto_resolves_to_what_torch_sees() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_unknown_device_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="unknown device") as err:
        resolve_device("gpu0")
    assert "cpu, cuda or auto" in (err.value.fix or "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's refusal")
def test_cuda_without_cuda_is_bad_input_before_any_work(adapters: list[Path]) -> None:
    for text in ("cuda", "cuda:1"):
        with pytest.raises(BadInputError, match="no CUDA device") as err:
            resolve_device(text)
        assert "--device cpu" in (err.value.fix or "")
    with pytest.raises(BadInputError, match="no CUDA device"):
        merge_adapters(adapters[:2], None, "ties", device="cuda")


def test_rebuild_replays_quantization_on_the_recorded_device() -> None:
    """A rebuild re-quantizes where the model was quantized (bitsandbytes' bytes depend on
    it): CPU records give a CPU spec; a CUDA record on a machine without CUDA is refused
    with exit 2 instead of silently rebuilding on the CPU and failing the byte check."""

    from merging.model.rebuild import _spec

    recorded = {"method": "nf4", "double_quant": True, "blocksize": 64,
                "compute_dtype": "float32", "skip_modules": []}
    spec = _spec(recorded)
    assert spec is not None and spec.device == "cpu"
    assert spec.to_json() == {**recorded, "skip_modules": []}
    if torch.cuda.is_available():
        gpu = _spec({**recorded, "device": "cuda"})
        assert gpu is not None and gpu.device.startswith("cuda")
    else:
        with pytest.raises(BadInputError) as caught:
            _spec({**recorded, "device": "cuda"})
        assert caught.value.exit_code == 2 and caught.value.fix
