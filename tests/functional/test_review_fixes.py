"""Bugs a code review of this round's changes found in them, each tried again.

* the shape check took a transposed ``Linear`` adapter for a ``Conv1D`` one: ``push --base``
  accepted it and ``unload`` crashed (exit 70);
* a binding time near year 9999 made every later push of that name exit 70;
* a socket in the store was an environment error (exit 6), not tampering (exit 3);
* ``ensure_weight_tying`` on inputs without embedding LoRA gave a false warning and flipped
  the flag off;
* ``verify REF`` reported another version's binding time;
* ``head.json`` with ``seq`` ``"2"``, ``true`` or ``1e999`` was read as a number or crashed.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from merging.lora.engine import merge_adapters
from tests.support.cli import run, run_json
from tests.support.merge import lora_config, random_adapter, write_adapter
from tests.support.registry import make_adapter_dir
from tests.support.tiny_llama import save_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture()
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "store"
    assert run(capsys, "init", root)[0] == 0
    return root


def test_a_transposed_linear_adapter_is_refused_by_push_and_unload(tmp_path, store, capsys):
    base = save_tiny_llama(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    inner, hidden = config["intermediate_size"], config["hidden_size"]
    bad = write_adapter(tmp_path / "tr", {"model.layers.0.mlp.up_proj": (
        torch.randn(2, inner), torch.randn(hidden, 2))}, lora_config(2, 4, ["up_proj"]))
    code, _, err = run(capsys, "push", bad, "--name", "t", "--base", base, "--store", store)
    assert code == 2 and "adapter needs base weight" in err, err
    code, _, err = run(capsys, "unload", bad, "--base", base, "--out", tmp_path / "o", "--no-sync")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists(), err


def test_a_far_future_binding_time_does_not_break_later_pushes(tmp_path, store, capsys):
    code, out = run_json(capsys, "push", make_adapter_dir(tmp_path / "a1", seed=1), "--name", "m",
                         "--store", store)
    digest = out["version"]["digest"]
    (store / "names" / "m" / "versions" / digest[7:]).write_text("9999-12-31T23:59:59.999999Z\n")
    code, _, err = run(capsys, "push", make_adapter_dir(tmp_path / "a2", seed=2), "--name", "m",
                       "--store", store)
    assert code == 0, err
    assert run(capsys, "verify", "--all", "--store", store)[0] == 3  # the edit is reported


def test_a_socket_in_the_store_is_tampering(tmp_path, store, capsys):
    run(capsys, "push", make_adapter_dir(tmp_path / "a1"), "--name", "m", "--store", store)
    head = store / "audit" / "head.json"
    head.unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(head))
        code, _, err = run(capsys, "audit", "verify", "--store", store)
    assert code == 3 and "not a regular file" in err, err


def test_the_tying_flag_alone_changes_nothing_in_a_merge(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (32, 32)}
    inputs = [random_adapter(tmp_path / f"a{i}", shapes, 2, seed=i, ensure_weight_tying=True)
              for i in (1, 2)]
    result = merge_adapters(inputs, method="linear")
    assert result.config["ensure_weight_tying"] is True
    assert not any("tied embeddings" in w for w in result.report["warnings"])


def test_verify_ref_reports_only_its_own_binding_time(tmp_path, store, capsys):
    digests = []
    for i in (1, 2):
        out = run_json(capsys, "push", make_adapter_dir(tmp_path / f"a{i}", seed=i), "--name", "m",
                       "--store", store)[1]
        digests.append(out["version"]["digest"])
    (store / "names" / "m" / "versions" / digests[0][7:]).write_text("2099-01-01T00:00:00.000000Z\n")
    assert run(capsys, "verify", f"m@{digests[1]}", "--store", store)[0] == 0
    assert run(capsys, "verify", f"m@{digests[0]}", "--store", store)[0] == 3


@pytest.mark.parametrize("seq", ['"2"', "true", "1e999", "2.0", "-1"])
def test_a_head_seq_that_is_not_an_integer_is_tampering(tmp_path, store, capsys, seq):
    run(capsys, "push", make_adapter_dir(tmp_path / "a1"), "--name", "m", "--store", store)
    head = store / "audit" / "head.json"
    head.write_text(head.read_text().replace('"seq":2', f'"seq":{seq}'))
    assert f'"seq":{seq}' in head.read_text()
    assert run(capsys, "audit", "verify", "--store", store)[0] == 3
    code, _, err = run(capsys, "push", make_adapter_dir(tmp_path / "a2", seed=2), "--name", "n",
                       "--store", store)
    assert code == 3 and "internal error" not in err, err
