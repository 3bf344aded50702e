"""Hugging Face Hub interop, offline: ``adapters pull`` from a hand-filled HF cache, ``push-hub``.

No network exists here. ``pull`` runs with ``HF_HUB_OFFLINE=1`` against a cache that
:func:`tests.support.hub.populate_hf_cache` lays out in huggingface_hub's documented
format, holding a real PEFT LoRA of a tiny Llama (hidden 64, non-zero B). The CLI
runs in a child process because huggingface_hub reads its environment at import.
``push-hub`` is checked through the library with an injected Hub client that copies
the uploaded folder to a local "remote" (which must equal the export and load in
PEFT with identical logits), and through the CLI with the real ``HfApi`` in offline
mode, which must fail with a one-line error and a fix.

The module-scoped ``world`` (one store, one HF cache) is shared; each test pulls
whatever versions it reads under its own names, so any test runs alone, in any
order, or on any xdist worker (each worker builds its own ``world``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hub import (
    BASE_MODEL_ID,
    HUB_LLAMA,
    ROOT,
    RecordingHubApi,
    commit_sha,
    hub_env,
    logits,
    populate_hf_cache,
    run_cli,
    save_lora,
)
from tests.support.tiny_llama import save_tiny_llama

REPO = "acme/tiny-lora"
C1, C2 = commit_sha("tiny-lora-1"), commit_sha("tiny-lora-2")
PEFT_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


@dataclass(frozen=True)
class World:
    root: Path
    base: Path
    a1: Path
    a2: Path
    store: Path
    env: dict[str, str]
    pulled: dict


def cli_json(env: dict[str, str], *args: str | Path) -> tuple[int, dict]:
    code, out, err = run_cli(env, *args, "--json")
    try:
        return code, json.loads(out)
    except ValueError as exc:
        raise AssertionError(f"exit {code}, stdout:\n{out}\nstderr:\n{err}") from exc


def blob(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.split(":", 1)[1]


def assert_files_equal(store: Path, version: dict, src: Path) -> None:
    assert {f["path"] for f in version["files"]} == PEFT_FILES
    for entry in version["files"]:
        assert blob(store, entry["digest"]).read_bytes() == (src / entry["path"]).read_bytes()


def assert_one_line_error(code: int, err: str, expected_code: int) -> list[str]:
    """One ``error:`` line then one ``fix:`` line end stderr (status lines may precede them)."""
    lines = err.strip().splitlines()[-2:]
    assert code == expected_code, err
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("fix: "), err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("hub")
    base = save_tiny_llama(root / "base", HUB_LLAMA)
    a1 = save_lora(base, root / "a1", seed=1)
    a2 = save_lora(base, root / "a2", seed=2)
    env = hub_env(root)
    cache = Path(env["HF_HUB_CACHE"])
    snap = populate_hf_cache(cache, REPO, a1, commit=C1, refs=("main",))
    (snap / "optimizer.pt").symlink_to(snap / "README.md")  # not a PEFT file: never taken
    populate_hf_cache(cache, REPO, a2, commit=C2, refs=("v2",))
    store = root / "store"
    code, _out, err = run_cli(env, "init", "--store", store)
    assert code == 0, err
    code, pulled = cli_json(env, "pull", f"hf://{REPO}", "--base", base, "--store", store)
    assert code == 0, pulled
    return World(root, base, a1, a2, store, env, pulled)


def test_pull_default_revision_records_repo_and_commit(world: World) -> None:
    data = world.pulled
    version = data["version"]
    assert data["created"] is True and version["name"] == REPO
    assert_files_equal(world.store, version, world.a1)
    record = version["record"]
    assert record["labels"] == {"hub_repo": REPO, "hub_revision": "main", "hub_commit": C1}
    assert record["base_model"]["id"] == BASE_MODEL_ID
    assert record["base_model"]["fingerprint"]["struct_digest"].startswith("sha256:")
    assert data["hub"] == {"uri": f"hf://{REPO}", "hub_repo": REPO, "hub_revision": "main",
                           "hub_commit": C1}
    # pulling the same commit again stores nothing new
    code, again = cli_json(world.env, "pull", f"hf://{REPO}", "--base", world.base,
                           "--store", world.store)
    assert code == 0 and again["created"] is False and again["new_bytes"] == 0
    assert again["version"]["digest"] == version["digest"]


def test_pull_explicit_commit_and_tag(world: World) -> None:
    code, data = cli_json(world.env, "pull", f"hf://{REPO}@{C2}", "--name", "acme/lora-v2",
                          "--alias", "candidate", "--store", world.store)
    assert code == 0, data
    version = data["version"]
    assert version["name"] == "acme/lora-v2"
    assert_files_equal(world.store, version, world.a2)
    assert version["record"]["labels"] == {"hub_repo": REPO, "hub_revision": C2,
                                           "hub_commit": C2}
    assert data["alias"]["new"] == version["digest"]

    code, tagged = cli_json(world.env, "pull", f"hf://{REPO}@v2", "--name", "acme/lora-v2",
                            "--store", world.store)
    assert code == 0, tagged
    assert tagged["version"]["record"]["labels"]["hub_commit"] == C2
    assert tagged["version"]["record"]["labels"]["hub_revision"] == "v2"
    assert_files_equal(world.store, tagged["version"], world.a2)


@pytest.mark.parametrize("source", ["hf://acme/not-cached", f"hf://{REPO}@no-such-branch"])
def test_pull_not_cached_offline_exits_5(world: World, source: str) -> None:
    code, _out, err = run_cli(world.env, "pull", source, "--store", world.store)
    lines = assert_one_line_error(code, err, 5)
    assert source in lines[0] and "HF_HUB_OFFLINE" in lines[1]
    code, data = cli_json(world.env, "pull", source, "--store", world.store)
    assert code == 5 and data["error"] == "NotFoundError" and data["fix"]


def test_bad_hf_refs_exit_2(world: World) -> None:
    bad = ["acme/tiny-lora", "hf://tiny-lora", "hf://acme/tiny/lora", f"hf://{REPO}@",
           "hf://acme/a--b", "hf://-acme/x", "hf://datasets/acme/x", f"hf://{REPO}@a..b",
           "hf://acme/x@a b", "https://huggingface.co/acme/x", f"hf://{REPO}@.",
           f"hf://{REPO}@./main", f"hf://{REPO}@main/."]
    for source in bad:
        code, _out, err = run_cli(world.env, "pull", source, "--store", world.store)
        assert_one_line_error(code, err, 2)
    code, _out, err = run_cli(world.env, "pull", f"hf://{REPO}", "--name", "../x",
                              "--store", world.store)
    assert_one_line_error(code, err, 2)


def test_push_hub_uploads_the_export(world: World, tmp_path: Path) -> None:
    from registry.export import export
    from registry.interop.hub import push_to_hub
    from registry.storage.store import Store

    store = Store.open(world.store)
    api = RecordingHubApi(tmp_path / "remote")
    result = push_to_hub(store, REPO, "acme/exported", private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True and api.calls[0][1]["exist_ok"] is True
    assert result.commit and result.commit_url.endswith(result.commit)
    assert result.version.digest == world.pulled["version"]["digest"]

    remote = tmp_path / "remote" / "acme" / "exported" / "main"
    local = export(store, REPO, tmp_path / "export").path
    names = sorted(p.name for p in remote.iterdir())
    assert names == sorted(p.name for p in local.iterdir()) == sorted(result.files)
    assert all((remote / n).read_bytes() == (local / n).read_bytes() for n in names)
    card = (remote / "README.md").read_text()
    front = card.split("---")[1]
    assert f'base_model: "{BASE_MODEL_ID}"' in front
    assert "base_model_relation: adapter" in front and "library_name: peft" in front
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (remote / name).read_bytes() == (world.a1 / name).read_bytes()

    import torch

    assert torch.equal(logits(world.base, remote), logits(world.base, world.a1))


def test_push_hub_to_a_branch(world: World, tmp_path: Path) -> None:
    from registry.interop.hub import push_to_hub
    from registry.storage.store import Store

    # its own source version and alias, so the test does not depend on another having run
    code, pulled = cli_json(world.env, "pull", f"hf://{REPO}@v2", "--name", "acme/branch-src",
                            "--alias", "candidate", "--store", world.store)
    assert code == 0, pulled
    api = RecordingHubApi(tmp_path / "remote")
    result = push_to_hub(Store.open(world.store), "acme/branch-src:candidate", "hf://acme/exp",
                         revision="dev", commit_message="try it", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[2][1]["revision"] == "dev" and api.calls[2][1]["commit_message"] == "try it"
    assert result.to_json()["revision"] == "dev"
    dev = tmp_path / "remote" / "acme" / "exp" / "dev"
    assert (dev / "adapter_model.safetensors").read_bytes() == \
        (world.a2 / "adapter_model.safetensors").read_bytes()


def test_push_hub_cli_errors(world: World) -> None:
    args = ("--token", "hf_dummy", "--store", world.store)
    code, _out, err = run_cli(world.env, "push-hub", REPO, "acme/exported", *args)
    lines = assert_one_line_error(code, err, 2)
    assert "HF_HUB_OFFLINE" in lines[0] + lines[1]
    code, data = cli_json(world.env, "push-hub", REPO, "acme/exported", *args)
    assert code == 2 and data["error"] == "BadInputError" and "HF_HUB_OFFLINE" in data["fix"]
    for repo_id in ("not-a-repo", "acme/x@dev", "acme/a/b"):
        code, _out, err = run_cli(world.env, "push-hub", REPO, repo_id, *args)
        assert_one_line_error(code, err, 2)
    code, _out, err = run_cli(world.env, "push-hub", "acme/unknown", "acme/exported", *args)
    assert_one_line_error(code, err, 5)


def test_hub_modules_import_nothing_heavy() -> None:
    heavy = ("huggingface_hub", "torch", "transformers", "peft")
    probe = ("import sys, json, cli.hub_cmds, registry.interop.hub\n"
             f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_a_snapshot_folder_linked_outside_the_cache_is_refused(world: World, tmp_path: Path) -> None:
    # found by a QA pass: a snapshot folder that is itself a link to a folder outside
    # models--org--name made the "inside the repo's cache folder" check compare against
    # the link's target, so files from anywhere were ingested
    from registry.errors import BadInputError
    from registry.interop.hub import stage_snapshot

    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (outside / name).write_bytes((world.a1 / name).read_bytes())
    repo = tmp_path / "cache" / "models--org--evil"
    (repo / "snapshots").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.symlink_to(outside, target_is_directory=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BadInputError, match="outside the cache folder"):
        stage_snapshot(snapshot, dest)
    assert not any(dest.iterdir())
