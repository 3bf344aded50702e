"""``--device`` on merge, quantize, unload, gate and merge-search (issue 16), on the CPU.

``--device cpu`` must give exactly what the default gives on a CPU-only machine (the
same stored digests: a second identical merge is deduplicated), and ``--device cuda``
where torch sees no CUDA device is exit 2 with a one-line error and a fix, before
anything is written. The CUDA comparisons are in tests/unit/test_gpu_paths.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.support.cli import run, run_json
from tests.support.merge import merge_cli
from tests.support.unload import make_adapter

pytestmark = pytest.mark.filterwarnings("ignore")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")


def tree_digest(root: Path) -> str:
    """sha256 over every file's name and bytes (the output is one directory, no subdirs)."""
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def assert_no_cuda_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()][-2:]  # after any info lines
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    assert lines[0].startswith("error: ") and "no CUDA device" in lines[0]
    assert lines[1].startswith("fix: ") and "--device cpu" in lines[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default is cuda there")
def test_merge_device_cpu_is_the_default(merge_store: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["merge", "math", "code", "--method", "ties", "--density", "0.4", "--seed", "2",
            "--store", str(merge_store), "--json"]
    code, first, err = merge_cli(args, capsys)
    assert code == 0 and first is not None, err
    assert first["device"] == "cpu"
    for device in ("cpu", "auto"):
        code, again, err = merge_cli([*args, "--device", device], capsys)
        assert code == 0 and again is not None, err
        assert again["created"] is False  # the very same bytes: deduplicated
        assert again["version"]["digest"] == first["version"]["digest"]


@NO_CUDA
def test_merge_device_cuda_without_cuda_is_exit_2(merge_store: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = merge_cli(["merge", "math", "code", "--device", "cuda",
                              "--store", str(merge_store)], capsys)
    assert_no_cuda_error(code, err)
    code, _, err = merge_cli(["merge", "math", "code", "--device", "tpu9",
                              "--store", str(merge_store)], capsys)
    assert code == 2 and "unknown device" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default is cuda there")
def test_quantize_and_unload_device_cpu_is_the_default(work: Path, base: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    digests = []
    for tag, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        code, data = run_json(capsys, "quantize", base, "--to", "nf4", "--out", work / f"q-{tag}",
                              "--no-probe", *extra)
        assert code == 0, data
        assert "device" not in data["quantization"]  # CPU records are what they were
        digests.append(tree_digest(work / f"q-{tag}"))
    assert digests[0] == digests[1]
    adapter = make_adapter(base, work / "adapter", r=4, alpha=8)
    unloaded = []
    for tag, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        code, data = run_json(capsys, "unload", adapter, "--base", base, "--out", work / f"u-{tag}", "--quantize", "int8",
                              "--no-probe", *extra)
        assert code == 0, data
        unloaded.append(tree_digest(work / f"u-{tag}"))
    assert unloaded[0] == unloaded[1]


@NO_CUDA
def test_quantize_unload_gate_search_device_cuda_without_cuda_is_exit_2(
        work: Path, base: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "quantize", base, "--to", "nf4", "--out", tmp_path / "q",
                       "--device", "cuda")
    assert_no_cuda_error(code, err)
    assert not (tmp_path / "q").exists()
    adapter = make_adapter(base, work / "adapter-cuda", r=4, alpha=8)
    code, _, err = run(capsys, "unload", str(adapter), "--base", base, "--out", tmp_path / "u",
                       "--quantize", "nf4", "--device", "cuda")
    assert_no_cuda_error(code, err)
    assert not (tmp_path / "u").exists()
    code, _, err = run(capsys, "gate", adapter, "--base", base, "--device", "cuda",
                       "--no-record")
    assert_no_cuda_error(code, err)
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"checks": []}))
    code, _, err = run(capsys, "merge-search", "a", "b", "--base", base, "--policy", policy,
                       "--device", "cuda", "--store", tmp_path / "store")
    assert_no_cuda_error(code, err)
