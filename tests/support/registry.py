"""Shared test helpers for the registry: tiny adapters, records and stores.

Everything is pure Python (no torch): safetensors files are written by hand
(:mod:`tests.support.safetensors_files`), so registry tests stay fast and do not
depend on torch or the ingest module.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from registry.record import TensorSummary, build_record
from registry.storage.store import PushResult, Store
from tests.support.safetensors_files import RawTensor, f32, write_safetensors

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_BASE = {"struct_digest": "sha256:" + "1" * 64, "weights_digest": "sha256:" + "2" * 64}


def make_adapter_dir(directory: Path, *, r: int = 4, hidden: int = 8, layers: int = 1,
                     seed: int = 0) -> Path:
    """A minimal PEFT LoRA directory (q_proj and v_proj of ``layers`` layers)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, RawTensor] = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = (
                "F32", [r, hidden], f32([rng.uniform(-1, 1) for _ in range(r * hidden)]))
            tensors[f"{prefix}.lora_B.weight"] = (
                "F32", [hidden, r], f32([rng.uniform(-1, 1) for _ in range(r * hidden)]))
    write_safetensors(directory / "adapter_model.safetensors", dict(sorted(tensors.items())),
                      metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
              "target_modules": ["v_proj", "q_proj"],
              "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": "tiny-llama"}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def adapter_files(directory: Path) -> dict[str, Path]:
    """``{relative path: path}`` of every file in an adapter directory."""
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file()}


def sample_record(directory: Path | None = None, **overrides: Any) -> dict:
    """A valid adapter record (for ``directory``'s config when given)."""
    config = json.loads((directory / "adapter_config.json").read_text()) if directory else \
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    kwargs: dict[str, Any] = {"fingerprint": FAKE_BASE, "base_model": "tiny-llama",
                              "base_revision": "main", "dataset": "alpaca-v1",
                              "hyperparameters": {"lr": 1e-4, "epochs": 2},
                              "metrics": {"eval_loss": 1.25}, "known_risks": ["toy data"],
                              "license": "apache-2.0", "author": "tester",
                              "labels": {"team": "nlp"}}
    kwargs.update(overrides)
    tensors = kwargs.pop("tensors", TensorSummary(count=4, dtypes={"F32": 4}, parameters=128))
    return build_record(config, tensors, **kwargs)


def new_store(tmp_path: Path, name: str = "store") -> Store:
    """A fresh store under ``tmp_path``."""
    return Store.open(tmp_path / name, create=True)


def push_adapter(store: Store, name: str, directory: Path, **record_overrides: Any) -> PushResult:
    """Push an adapter directory with a sample record."""
    return store.push(name, adapter_files(directory), sample_record(directory, **record_overrides))


def blob_bytes(store: Store) -> int:
    """Total bytes under ``blobs/``."""
    return sum(p.stat().st_size for p in (store.root / "blobs").rglob("*") if p.is_file())


def run_together(target: Callable[..., None], jobs: Sequence[tuple[Any, ...]], *,
                 timeout: float = 300) -> list[Any]:
    """Run ``target(*job, start, results)`` in one spawned process per job, all released at once.

    Each process waits on the ``start`` event, then puts one result on the ``results``
    queue. Returns the results (in arrival order); asserts every process exits 0.
    """
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*job, start, results)) for job in jobs]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = [results.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return outcomes


def child_env() -> dict[str, str]:
    """Environment for child Python processes that import the repo's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("ADAPTERS_ACTOR", "test")
    return env


PYTHON = sys.executable
