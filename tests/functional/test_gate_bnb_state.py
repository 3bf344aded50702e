"""The structural check's reading of bitsandbytes checkpoints, and drift's arithmetic.

``gate.bnb_state`` is run on checkpoints written by ``adapters quantize`` (the
serialization transformers reads back, see test_quantize.py): int8, nf4 with double
quantization and fp4, clean and with one field broken. ``drift_stats`` is compared
with ``torch.nn.functional.kl_div`` and ``argmax`` on random logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gate.bnb_state import check_quantized, read_layout
from merging.model.quantize import quantize
from tests.support.unload import state_of

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def checkpoints(work: Path, base: Path) -> dict[str, Path]:
    return {"int8": quantize(base, "int8", out=work / "int8").out_dir,
            "nf4-dq": quantize(base, "nf4", out=work / "nf4-dq", double_quant=True).out_dir,
            "fp4": quantize(base, "fp4", out=work / "fp4", blocksize=128).out_dir}


def _rewrite(src: Path, dest: Path, change) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    tensors = state_of(dest)
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("kind", ["int8", "nf4-dq", "fp4"])
def test_clean_checkpoints_pass_with_logical_shapes(checkpoints, base, kind):
    from registry.formats.fingerprint import model_weight_shapes

    layout = read_layout(checkpoints[kind])
    assert layout.problems == []
    assert layout.logical == model_weight_shapes(base)  # quantization state set aside
    assert len(layout.int8 if kind == "int8" else layout.four_bit) == 14
    extras = {n.rsplit(".", 1)[-1] for n in layout.companions}
    assert extras >= ({"SCB", "weight_format"} if kind == "int8" else
                      {"absmax", "quant_map", f"bitsandbytes__{kind[:3]}"})
    if kind == "nf4-dq":
        assert {"nested_absmax", "nested_quant_map"} <= extras
    assert check_quantized(checkpoints[kind], layout) == (14, [])


Q = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("kind, change, expected", [
    ("int8", lambda t: t[f"{Q}.SCB"].__setitem__(0, float("inf")), "SCB holds NaN/inf"),
    ("int8", lambda t: t.__setitem__(f"{Q}.SCB", t[f"{Q}.SCB"][:3].clone()), "row scales"),
    ("int8", lambda t: t.__setitem__(f"{Q}.weight_format", torch.tensor(1, dtype=torch.uint8)),
     "row-major"),
    ("nf4-dq", lambda t: t[f"{Q}.weight.nested_absmax"].__setitem__(0, float("nan")),
     "nested_absmax holds NaN/inf"),
    ("nf4-dq", lambda t: t.__setitem__(f"{Q}.weight.nested_quant_map", torch.zeros(255)),
     "nested_quant_map has 255 values"),
    ("fp4", lambda t: t[f"{Q}.weight.quant_map"].__setitem__(2, float("inf")),
     "quant_map holds NaN/inf"),
    ("fp4", lambda t: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"][:-1].clone()),
     "packed weight holds"),
])
def test_broken_field_is_named(checkpoints, tmp_path, kind, change, expected):
    broken = _rewrite(checkpoints[kind], tmp_path / "broken", change)
    count, problems = check_quantized(broken, read_layout(broken))
    assert count == 14 and len(problems) == 1 and expected in problems[0], problems


def test_quant_state_json_is_validated_before_use(checkpoints, tmp_path):
    key = f"{Q}.weight.quant_state.bitsandbytes__fp4"

    def hostile(tensors):
        state = {"quant_type": "fp4", "blocksize": 128, "dtype": "__import__", "shape": [64, -1]}
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    broken = _rewrite(checkpoints["fp4"], tmp_path / "hostile", hostile)
    layout = read_layout(broken)
    assert layout.logical[f"{Q}.weight"] is None
    assert len(layout.problems) == 1 and "dtype '__import__'" in layout.problems[0]
    assert "shape [64, -1]" in layout.problems[0]
    _, problems = check_quantized(broken, layout)
    assert problems == layout.problems


def test_dequantized_weights_are_checked(checkpoints, tmp_path):
    """A finite but absurd scale passes the tensor checks; the dequantized weight does not."""
    def huge(tensors):
        tensors[f"{Q}.SCB"][0] = 3e38  # a finite row scale; 127 * 3e38 is inf in float32

    broken = _rewrite(checkpoints["int8"], tmp_path / "huge", huge)
    _, problems = check_quantized(broken, read_layout(broken))
    assert problems == [f"{Q}.weight: dequantized weight holds NaN/inf"]


def test_drift_stats_match_torch():
    import torch.nn.functional as F

    from gate.checks.drift import drift_stats

    gen = torch.Generator().manual_seed(0)
    source = torch.randn(7, 50, generator=gen) * 3
    cand = source + torch.randn(7, 50, generator=gen)
    got = drift_stats(source, cand)
    reference = F.kl_div(F.log_softmax(cand.double(), -1), F.log_softmax(source.double(), -1),
                         log_target=True, reduction="sum")
    assert got["kl_sum"] == pytest.approx(float(reference), rel=1e-9)
    assert got["agree"] == int((source.argmax(-1) == cand.argmax(-1)).sum())
    assert got["max_diff"] == pytest.approx(float((cand - source).abs().max()), rel=1e-6)
    assert drift_stats(source, source)["kl_sum"] == pytest.approx(0.0, abs=1e-12)
    cand[0, 0] = float("nan")
    assert drift_stats(source, cand)["kl_sum"] == float("inf")
