"""``adapters merge`` with breadcrumbs, DELLA and ``--align knots``: options, lineage, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.merge import merge_cli


@pytest.mark.parametrize("method,extra,recorded", [
    ("breadcrumbs", ["--gamma", "0.05", "--normalize"],
     {"density": 0.5, "gamma": 0.05, "lambda": 1.0, "normalize": True}),
    ("breadcrumbs_ties", ["--density", "0.4"],
     {"density": 0.4, "gamma": 0.01, "lambda": 1.0, "sign_election": "sum"}),
    ("della", ["--epsilon", "0.1", "--sign-election", "mergekit"],
     {"density": 0.5, "epsilon": 0.1, "lambda": 1.0, "sign_election": "mergekit"}),
    ("della_linear", ["--density", "0.3", "--epsilon", "0.2", "--rank", "full"],
     {"density": 0.3, "epsilon": 0.2, "lambda": 1.0, "normalize": False}),
])
def test_new_methods_run_and_record_their_parameters(merge_store: Path, capsys, method: str,
                                                     extra: list[str], recorded: dict) -> None:  # type: ignore[no-untyped-def]
    args = ["merge", "math", "code", "--method", method, *extra, "--seed", "2", "--store",
            str(merge_store), "--json"]
    code, data, err = merge_cli(args, capsys)
    assert code == 0, err
    assert data["version"]["name"] == f"math-{method}"
    parameters = data["version"]["lineage"]["recipe"]["parameters"]
    assert {k: parameters[k] for k in recorded} == recorded
    assert "align" not in parameters
    if "full" in extra:
        assert data["error"] < 1e-6
    code, again, _ = merge_cli(args, capsys)  # deterministic for a seed: the same version
    assert code == 0 and again["created"] is False
    assert again["version"]["digest"] == data["version"]["digest"]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_align_knots_is_recorded(merge_store: Path, capsys, method: str) -> None:  # type: ignore[no-untyped-def]
    code, data, err = merge_cli(["merge", "math", "code", "--method", method, "--align", "knots",
                                "--store", str(merge_store), "--json"], capsys)
    assert code == 0, err
    assert data["version"]["name"] == f"math-{method}-knots"
    assert data["version"]["lineage"]["recipe"]["parameters"]["align"] == "knots"
    assert data["parameters"]["align"] == "knots"
    assert data["error"] < 1e-5  # exact factors of rank <= 4 + 8
    assert max(m["rank"] for m in data["modules"].values()) <= 12


@pytest.mark.parametrize("args,message", [
    (["--method", "breadcrumbs", "--gamma", "1"], "gamma must be in [0, 1)"),
    (["--method", "breadcrumbs_ties", "--gamma", "-0.5"], "gamma must be in [0, 1)"),
    (["--method", "della", "--epsilon", "0.6"], "density ± epsilon must lie in (0, 1)"),
    (["--method", "della_linear", "--density", "0.95"], "density ± epsilon must lie in (0, 1)"),
    (["--method", "della", "--epsilon", "-0.1"], "epsilon must be in [0, 1)"),
    (["--method", "ties", "--gamma", "0.1"], "--gamma does not apply to method ties"),
    (["--method", "dare_ties", "--epsilon", "0.1"], "--epsilon does not apply to method dare_ties"),
    (["--method", "linear", "--align", "knots"], "--align does not apply to method linear"),
    (["--method", "ties", "--align", "svd"], "unknown alignment"),
])
def test_bad_parameters_exit_2_with_one_line(merge_store: Path, capsys, args: list[str],
                                             message: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = merge_cli(["merge", "math", "code", *args, "--store", str(merge_store)], capsys)
    assert code == 2
    assert message in err
    first = next(line for line in err.splitlines() if message in line)
    assert message in first  # the message itself is one line
    code, data, _ = merge_cli(["merge", "math", "code", *args, "--store", str(merge_store), "--json"], capsys)
    assert code == 2 and data["error"] == "BadInputError" and "\n" not in data["message"]


def test_help_lists_the_new_options(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, _ = merge_cli(["merge", "--help"], capsys)
    assert code == 0
    import cli.main as cli_main
    from typer.main import get_command

    command = get_command(cli_main.app).commands["merge"]  # type: ignore[attr-defined]
    options = {opt for p in command.params for opt in getattr(p, "opts", ())}
    assert {"--gamma", "--epsilon", "--align"} <= options


@pytest.mark.parametrize("kind", ["non-empty dir", "file", "under a file"])
def test_an_unusable_out_pushes_nothing(merge_store: Path, capsys, tmp_path: Path,
                                        kind: str) -> None:  # type: ignore[no-untyped-def]
    # found by a QA pass: the merge was pushed before --out was written, so a bad --out
    # failed the command (exit 4/6) with the version already in the store and the audit log
    from registry.storage.store import Store

    out = tmp_path / "out"
    if kind == "non-empty dir":
        out.mkdir()
        (out / "keep").write_text("x")
    elif kind == "file":
        out.write_text("x")
    else:
        out.write_text("x")
        out = out / "sub"
    store = Store.open(merge_store)
    before = len(store.audit().entries())
    code, data, err = merge_cli(["merge", "math", "code", "--method", "ties", "--name", "skills",
                                 "--out", str(out), "--store", str(merge_store), "--json"], capsys)
    assert code in (4, 6) and data is not None and data["exit_code"] == code
    assert "skills" not in store.names()
    assert len(store.audit().entries()) == before
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left beside it


def test_out_is_written_with_the_version(merge_store: Path, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    code, data, err = merge_cli(["merge", "math", "code", "--method", "ties", "--name", "skills",
                                 "--out", str(tmp_path / "empty"), "--store", str(merge_store),
                                 "--json"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_a_killed_merges_staging_dir_is_removed_by_the_next_one(merge_store: Path, capsys,
                                                                  tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import time

    stale, live = tmp_path / ".out.abcd1234.tmp", tmp_path / ".out.live0000.tmp"
    for path in (stale, live):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - 7200
    for path in (stale, stale / "adapter_model.safetensors"):
        os.utime(path, (old, old))
    code, _, err = merge_cli(["merge", "math", "code", "--method", "linear", "--out",
                              str(tmp_path / "out"), "--store", str(merge_store)], capsys)
    assert code == 0, err
    assert not stale.exists() and live.exists()
