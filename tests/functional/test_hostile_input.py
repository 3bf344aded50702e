"""Hostile adapter configs and gate policies through the real CLI (issue 11 items 7-9).

* item 7: a ``rank_pattern`` that makes Python's ``re`` backtrack exponentially is pushed
  in seconds (matched by RE2); a lookaround pattern RE2 cannot run is refused by
  ``adapters push`` with exit 2 and one ``error:`` line;
* item 8: the 470-byte "billion laughs" policy makes ``adapters gate`` exit 2 in under
  a second, with bounded memory, measured in a child process (so a regression is a
  failed assertion, not a hung or swapping test run);
* item 9: policy data files outside the policy's directory are refused (exit 2, the
  field named) unless ``--allow-outside-data``; ordinary relative paths keep working.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.cli import run, write_synthetic_adapter, write_synthetic_base
from tests.support.registry import PYTHON, REPO_ROOT, child_env
from tests.unit.test_policy_hostile import billion_laughs

# Runs `adapters ARGS` in this child, timing main() and measuring peak RSS growth.
CHILD = """
import json, resource, sys, time, io, contextlib
from cli.main import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
err = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
elapsed = time.perf_counter() - start
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"code": code, "elapsed": elapsed, "rss_kb": grown, "err": err.getvalue()}))
"""


def _child(*args: str | Path, timeout: float = 60) -> dict:
    proc = subprocess.run([PYTHON, "-c", CHILD, *map(str, args)], cwd=REPO_ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("fix: "), err
    return lines


# --- item 7: patterns ----------------------------------------------------------------------

def _adapter_with(tmp_path: Path, module: str | None = None, **config: object) -> Path:
    adapter = write_synthetic_adapter(tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if module is not None:  # one extra LoRA module with a hostile name
        import numpy as np
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.zeros((4, 16), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((16, 4), np.float32)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


def test_backtracking_rank_pattern_is_pushed_in_seconds(tmp_path, capsys):
    # the case: Python's re takes > 90 s on (a|aa)+ against 44 a's then b
    adapter = _adapter_with(tmp_path, "a" * 44 + "b", rank_pattern={"(a|aa)+": 4})
    assert run(capsys, "init", "--store", tmp_path / "store")[0] == 0
    out = _child("push", adapter, "--name", "redos", "--store", tmp_path / "store", "--json",
                 timeout=30)
    assert out["code"] == 0, out["err"]
    assert out["elapsed"] < 5, out


@pytest.mark.parametrize(("field", "value"), [
    ("rank_pattern", {"(?<=self_attn\\.)q_proj": 2}),
    ("alpha_pattern", {"q_proj(?!x)": 2}),
    ("target_modules", "(q|v)_proj\\1"),
])
def test_pattern_re2_cannot_run_is_refused_at_push(tmp_path, capsys, field, value):
    adapter = _adapter_with(tmp_path, **{field: value})
    assert run(capsys, "init", "--store", tmp_path / "store")[0] == 0
    code, _, err = run(capsys, "push", adapter, "--name", "look", "--store", tmp_path / "store")
    assert code == 2
    error = _error_lines(err)[0]
    assert field in error and "linear time" in error
    code, out, _ = run(capsys, "ls", "--store", tmp_path / "store", "--json")
    assert "look" not in out


# --- item 8: YAML bomb ---------------------------------------------------------------------

def test_yaml_bomb_policy_exits_2_fast_with_bounded_memory(tmp_path):
    policy = tmp_path / "gate.yaml"
    policy.write_text(billion_laughs())
    assert policy.stat().st_size < 500
    adapter = write_synthetic_adapter(tmp_path / "adapter")
    out = _child("gate", adapter, "--base", tmp_path, "--policy", policy, "--no-record", timeout=30)
    assert out["code"] == 2, out
    assert out["elapsed"] < 1.0, out
    assert out["rss_kb"] < 64 * 1024, out  # KiB on Linux: the run grew by 3.1 GB
    error = _error_lines(out["err"])[0]
    assert "aliases" in error and len(error) < 300


# --- item 9: data paths --------------------------------------------------------------------

@pytest.fixture()
def gate_world(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(adapter dir, base dir, policy dir) with data inside and a secret outside."""
    base = write_synthetic_base(tmp_path / "base")
    adapter = write_synthetic_adapter(tmp_path / "adapter")
    policies = tmp_path / "repo" / "policies"
    (policies / "data").mkdir(parents=True)
    (policies / "data" / "eval.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "secret.jsonl").write_text('{"text": "TOKEN=hunter2"}\n')
    os.symlink(tmp_path / "secret.jsonl", policies / "data" / "link-out.jsonl")
    return adapter, base, policies


def _policy(policies: Path, data: str) -> Path:
    # merge_equivalence reads (and hashes) its data at load time; a non-merge skips it
    doc = {"version": 1, "checks": [{"kind": "structural", "fingerprint": "skip"},
                                    {"kind": "merge_equivalence", "data": data}]}
    path = policies / "gate.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _gate(capsys, adapter: Path, base: Path, policy: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "gate", adapter, "--base", base, "--policy", policy, "--no-record", *extra)


ESCAPES = ["../../secret.jsonl", "{tmp}/secret.jsonl", "/etc/passwd", "/proc/self/environ",
           "data/link-out.jsonl", "data/../../../secret.jsonl"]


@pytest.mark.parametrize("escape", ESCAPES)
def test_policy_data_outside_its_directory_is_refused(tmp_path, capsys, gate_world, escape):
    adapter, base, policies = gate_world
    policy = _policy(policies, escape.format(tmp=tmp_path))
    code, _, err = _gate(capsys, adapter, base, policy)
    assert code == 2, err
    error, fix = _error_lines(err)
    assert "checks[1].data" in error and "outside the policy's directory" in error
    assert "hunter2" not in err and "--allow-outside-data" in fix


def test_allow_outside_data_lets_the_gate_read_it(tmp_path, capsys, gate_world):
    adapter, base, policies = gate_world
    policy = _policy(policies, "../../secret.jsonl")
    code, out, err = _gate(capsys, adapter, base, policy, "--allow-outside-data", "--json")
    assert code == 0, err
    assert json.loads(out)["passed"] is True


def test_policy_data_inside_its_directory_keeps_working(tmp_path, capsys, gate_world):
    adapter, base, policies = gate_world
    policy = _policy(policies, "data/eval.jsonl")
    code, out, err = _gate(capsys, adapter, base, policy, "--json")
    assert code == 0, err
    assert json.loads(out)["passed"] is True
