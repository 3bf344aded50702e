"""Helpers for the Hub interop tests: a hand-made HF cache, a recording Hub client, the CLI.

* :func:`populate_hf_cache` lays files out exactly as huggingface_hub's documented
  cache does (``models--org--name/blobs/<id>``, ``snapshots/<commit>/<file>`` as
  relative symlinks to ``../../blobs/<id>``, ``refs/<branch>`` holding the commit):
  blob ids are the sha256 for LFS-style files (weights) and the git blob sha1 for
  small text files, as the Hub's etags are.
* :class:`RecordingHubApi` implements ``create_repo`` / ``create_branch`` /
  ``upload_folder`` of ``HfApi`` by copying the uploaded folder into a local
  "remote" directory per repo and branch; it is the injected client, not a mock of
  the code under test.
* :func:`run_cli` runs ``adapters`` in a child process with the given environment,
  because huggingface_hub reads ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` at import time.
  Until ``cli.hub_cmds`` is listed in ``cli.main.COMMAND_MODULES`` the child
  registers it on the app itself.

torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL_ID = "acme/tiny-llama"
LFS_SUFFIXES = (".safetensors", ".bin")
HUB_LLAMA = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128}
"""The Hub tests' base (a :func:`tests.support.tiny_llama.tiny_llama` preset)."""
PROBE_IDS = [[1, 5, 9, 23, 42, 77, 3, 64]]

_CHILD = """
import sys
import cli.main as m
if "cli.hub_cmds" not in m.COMMAND_MODULES:
    from cli import hub_cmds
    hub_cmds.register(m.app)
sys.exit(m.main(sys.argv[1:]))
"""


def save_lora(base_dir: Path, out_dir: Path, *, seed: int = 1) -> Path:
    """Save a PEFT LoRA for ``base_dir`` with non-zero B, as a Hub repo would hold it.

    ``base_model_name_or_path`` is set to :data:`BASE_MODEL_ID` (a Hub id rather than
    the local path PEFT records), and PEFT's own ``README.md`` model card is kept.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                   target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:  # PEFT initialises B to zero: make the adapter matter
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(out_dir)
    config_path = Path(out_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def commit_sha(label: str) -> str:
    """A deterministic 40-hex commit id."""
    return hashlib.sha1(label.encode()).hexdigest()


def _blob_id(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def populate_hf_cache(cache_dir: Path, repo_id: str, src_dir: Path, *, commit: str,
                      refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of ``src_dir`` into the HF cache as ``repo_id`` at ``commit``.

    Returns the snapshot directory.
    """
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(src_dir).iterdir()):
        data = src.read_bytes()
        blob = repo / "blobs" / _blob_id(src.name, data)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.join("..", "..", "blobs", blob.name))
    for ref in refs:
        ref_path = repo / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


@dataclass
class FakeCommitInfo:
    """The fields of ``huggingface_hub.CommitInfo`` that adapterkit reads."""

    oid: str
    commit_url: str
    commit_message: str


@dataclass
class RecordingHubApi:
    """A local stand-in for ``HfApi``: uploads land in ``remote/<org>/<name>/<branch>``."""

    remote: Path
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        (self.remote / repo_id / "main").mkdir(parents=True, exist_ok=True)
        return f"https://hub.test/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, **kwargs}))
        target = self.remote / repo_id / branch
        if not target.exists():
            shutil.copytree(self.remote / repo_id / "main", target)

    def upload_folder(self, *, repo_id: str, folder_path: str, revision: str | None = None,
                      **kwargs: Any) -> FakeCommitInfo:
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path,
                                             "revision": revision, **kwargs}))
        target = self.remote / repo_id / (revision or "main")
        if not target.is_dir():
            raise FileNotFoundError(f"no branch {revision}")  # what the Hub would refuse too
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        oid = commit_sha(f"{repo_id}:{len(self.calls)}")
        return FakeCommitInfo(oid, f"https://hub.test/{repo_id}/commit/{oid}",
                              kwargs.get("commit_message", ""))


def hub_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Child environment: offline, HF cache and home under ``tmp``, no ambient token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_CACHE=str(tmp / "hf_cache"),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", ADAPTERS_ACTOR="hub-test",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str | Path) -> tuple[int, str, str]:
    """Run ``adapters ARGS`` in a child process; return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def logits(base_dir: Path, adapter_dir: Path) -> Any:
    """Logits of ``PeftModel.from_pretrained(base, adapter_dir)`` on a fixed probe."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        return model.eval()(torch.tensor(PROBE_IDS)).logits
