"""``adapters merge`` end to end: store refs in, a pushed version with lineage out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.merge import CLI_SHAPES, MERGE_LLAMA, merge_cli, random_adapter
from tests.support.tiny_llama import save_tiny_llama

def test_merge_pushes_a_version_with_lineage(merge_store: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "merged"
    args = ["merge", "math", "code", "--method", "ties", "--weights", "0.7,0.3", "--density", "0.5",
            "--seed", "3", "--name", "team/merged", "--out", str(out), "--store", str(merge_store), "--json"]
    code, data, err = merge_cli(args, capsys)
    assert code == 0, err
    assert data["created"] is True and data["version"]["name"] == "team/merged"
    lineage = data["version"]["lineage"]
    assert [p["weight"] for p in lineage["parents"]] == [0.7, 0.3]
    assert [p["ref"].split("@")[0] for p in lineage["parents"]] == ["math", "code"]
    assert {p["role"] for p in lineage["parents"]} == {"input"}
    recipe = lineage["recipe"]
    assert recipe["method"] == "ties"
    assert recipe["parameters"] == {"density": 0.5, "lambda": 1.0, "sign_election": "sum",
                                    "seed": 3, "rank": None, "allow_base_mismatch": False}
    assert recipe["tool"] == "adapterkit" and recipe["tool_version"]
    report = lineage["report"]
    assert set(report["modules"]) == {f"base_model.model.{n}" for n in CLI_SHAPES}
    assert 0 < report["error"] < 1 and report["max_error"] >= report["error"] * 0.5
    assert all(m["rank"] == 8 for m in report["modules"].values())
    record = data["version"]["record"]
    assert record["base_model"]["fingerprint"] is not None  # carried over from the inputs
    assert record["peft"]["r"] == 8
    # --out wrote the same files that were stored
    stored = {f["path"]: f["digest"] for f in data["version"]["files"]}
    import hashlib
    for path, digest in stored.items():
        assert "sha256:" + hashlib.sha256((out / path).read_bytes()).hexdigest() == digest
    # the same merge again is the same version (deterministic, deduplicated)
    again = [a for a in args if a not in ("--out", str(out))]
    code, data2, _ = merge_cli(again, capsys)
    assert code == 0 and data2["created"] is False
    assert data2["version"]["digest"] == data["version"]["digest"]
    code, tree, _ = merge_cli(["lineage", "team/merged", "--store", str(merge_store), "--json"], capsys)
    assert code == 0 and "math" in json.dumps(tree) and "code" in json.dumps(tree)


@pytest.mark.parametrize("method,extra", [("linear", ["--normalize"]), ("cat", []),
                                          ("task_arithmetic", ["--lambda", "0.5"]),
                                          ("dare_ties", ["--density", "0.3", "--rank", "4"]),
                                          ("dare_linear", ["--density", "0.9"]),
                                          ("magnitude_prune", ["--density", "0.2", "--rank", "full"])])
def test_every_method_runs(merge_store: Path, capsys, method: str, extra: list[str]) -> None:  # type: ignore[no-untyped-def]
    code, data, err = merge_cli(["merge", "math", "code", "--method", method, *extra, "--store", str(merge_store),
                                "--json"], capsys)
    assert code == 0, err
    assert data["version"]["name"] == f"math-{method}"
    if method in ("linear", "cat", "task_arithmetic") or "full" in extra:
        assert data["error"] < 1e-6


@pytest.mark.parametrize("args,message", [
    (["--method", "ties", "--density", "0"], "density must be in (0, 1]"),
    (["--method", "dare_ties", "--density", "1.5"], "density must be in (0, 1]"),
    # found by a QA pass: 1/density overflowed float32 and the merge blamed the weights
    (["--method", "dare_ties", "--density", "1e-300"], "at least 1.2e-38"),
    (["--method", "linear", "--density", "0.5"], "does not apply"),
    (["--method", "ties", "--weights", "1,2,3"], "--weights needs 2"),
    (["--method", "ties", "--rank", "zero"], "--rank"),
    (["--method", "slerp"], "unknown merge method"),
    (["--method", "ties", "--sign-election", "vote"], "unknown sign election"),
])
def test_bad_input_is_exit_2(merge_store: Path, capsys, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = merge_cli(["merge", "math", "code", *args, "--store", str(merge_store)], capsys)
    assert code == 2
    assert message in err


def test_base_weights_mismatch_needs_the_flag(merge_store: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, data, err = merge_cli(["merge", "math", "drift", "--store", str(merge_store), "--json"], capsys)
    assert code == 2 and data["error"] == "BaseMismatchError" and "not its weights" in data["message"]
    code, data, err = merge_cli(["merge", "math", "drift", "--allow-base-mismatch", "--store", str(merge_store),
                                "--json"], capsys)
    assert code == 0, err
    warnings = data["version"]["lineage"]["report"]["warnings"]
    assert any("merged anyway" in w for w in warnings)
    assert data["version"]["lineage"]["recipe"]["parameters"]["allow_base_mismatch"] is True


def test_base_structure_mismatch_is_refused(merge_store: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    wide = save_tiny_llama(tmp_path / "wide-base", MERGE_LLAMA, vocab_size=128,
                           max_position_embeddings=2048)  # LlamaConfig's own default
    adapter = random_adapter(tmp_path / "wide", CLI_SHAPES, 4, seed=9)
    assert merge_cli(["push", str(adapter), "--name", "wide", "--base", str(wide), "--store", str(merge_store)],
                     capsys)[0] == 0
    code, data, _ = merge_cli(["merge", "math", "wide", "--allow-base-mismatch", "--store", str(merge_store),
                              "--json"], capsys)
    assert code == 2 and data["error"] == "BaseMismatchError"
    assert "different structure" in data["message"] and "math@" in data["message"]


def test_dora_input_is_refused(merge_store: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tests.support.merge import PREFIX

    adapter = random_adapter(tmp_path / "dora", CLI_SHAPES, 4, seed=4, use_dora=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for name, (rows, _) in CLI_SHAPES.items():
        tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = torch.ones(rows)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    assert merge_cli(["push", str(adapter), "--name", "dora", "--store", str(merge_store)], capsys)[0] == 0
    code, data, _ = merge_cli(["merge", "math", "dora", "--store", str(merge_store), "--json"], capsys)
    assert code == 2 and data["error"] == "UnsupportedAdapterError" and "DoRA" in data["message"]
    # the refusal names the version, not the scratch copy under the store's tmp/
    assert data["message"].startswith("dora@sha256:") and "/tmp/" not in data["message"]


def test_cli_lists_every_registered_method() -> None:
    import typing

    from cli import merge_cmds
    from merging.lora.methods import METHODS, PARAMETER_HELP, SIGN_ELECTIONS

    # the --method help is built from the methods' registry: it names every method
    method_help = typing.get_type_hints(merge_cmds.merge, include_extras=True)["method"]
    assert all(name in method_help.__metadata__[0].help for name in METHODS)
    assert set(SIGN_ELECTIONS) == {"sum", "frequency", "mergekit"}
    # the CLI's --sign-election help comes from the methods' registry and names each one
    assert all(e in PARAMETER_HELP["sign_election"] for e in SIGN_ELECTIONS)
