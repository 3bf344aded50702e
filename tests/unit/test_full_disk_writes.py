"""A full disk while safetensors writes is an environment failure (exit 6), not a bug or bad input.

safetensors' writer raises ``SafetensorError("... (os error 28)")``, not an ``OSError``:
``merge``/``merge --out`` exited 70 (internal error) and ``push --allow-pickle`` exited 2
with "re-save the adapter" (found by a resource-exhaustion pass on a real full tmpfs).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from merging.lora.engine import merge_adapters
from merging.lora.peft_output import write_peft_dir
from registry.errors import EXIT_ENVIRONMENT, EnvironmentFailure, os_error_in
from registry.ingest import convert_pickle
from tests.support.merge import random_adapter

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def full_disk(*_args: object, **_kwargs: object) -> None:
    raise SafetensorError(FULL)


def test_os_error_in_reads_the_errno_a_library_names() -> None:
    found = os_error_in(SafetensorError(FULL))
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC
    assert os_error_in(OSError(errno.EFBIG, "File too large")).errno == errno.EFBIG
    assert os_error_in(SafetensorError("invalid header")) is None


def test_a_full_disk_while_writing_a_merge_is_exit_6_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"model.layers.0.self_attn.q_proj": (16, 16)}
    inputs = [random_adapter(tmp_path / f"in{i}", shapes, r=2, seed=i) for i in (1, 2)]
    result = merge_adapters(inputs, [0.5, 0.5], "linear")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(EnvironmentFailure, match="no space left on device") as info:
        write_peft_dir(result, tmp_path / "out" / "merged")
    assert info.value.exit_code == EXIT_ENVIRONMENT and info.value.fix
    assert list((tmp_path / "out").iterdir()) == []  # no temp directory left behind


def test_a_full_disk_while_converting_a_pickle_is_exit_6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}
    torch.save(state, tmp_path / "adapter_model.bin")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(EnvironmentFailure, match="no space left on device") as info:
        convert_pickle(tmp_path / "adapter_model.bin", tmp_path / "adapter_model.safetensors")
    assert info.value.exit_code == EXIT_ENVIRONMENT and "re-save" not in info.value.fix
