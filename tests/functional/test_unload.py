"""Merge-and-unload end to end on tiny random Llamas built with transformers + PEFT.

The reference is PEFT itself: ``PeftModel.from_pretrained(base, adapter)`` logits and
``merge_and_unload()`` weights. Measured here (float32): logits agree to ~2e-7 and the
merged tensors are bitwise equal to PEFT's; the tests assert 1e-5 / 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merging.model.unload import unload
from registry.errors import BadInputError, BaseMismatchError, ConflictError
from registry.formats.fingerprint import fingerprint_model
from registry.storage.store import Store
from tests.support.cli import run, run_json
from tests.support.unload import (EXTRA_FILES, leftovers, load_model, logits, make_adapter,
                                   make_base, peft_model, shard_layout, state_of)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def adapter(work: Path, base: Path) -> Path:
    # rank_pattern/alpha_pattern and rslora exercise the per-module scale
    return make_adapter(base, work / "adapter", r=4, alpha=8, use_rslora=True,
                        rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3})


@pytest.fixture()
def cli_app() -> None:
    """Make sure ``unload``/``quantize`` are registered on the app ``main`` runs."""
    import typer

    from cli import main as cli_main
    from cli import unload_cmds

    if "unload" not in typer.main.get_command(cli_main.app).commands:  # type: ignore[attr-defined]
        unload_cmds.register(cli_main.app)


def test_logits_and_weights_equal_peft(work: Path, base: Path, adapter: Path) -> None:
    out = work / "merged"
    result = unload(adapter, base, out)
    reference = peft_model(base, adapter)
    expected_logits = logits(reference)
    got = load_model(out)
    assert "peft" not in type(got).__module__
    assert (logits(got) - expected_logits).abs().max().item() <= 1e-5
    merged = reference.merge_and_unload().state_dict()
    mine = state_of(out)
    assert set(mine) == set(merged)
    assert max((mine[k] - merged[k]).abs().max().item() for k in mine) <= 1e-6
    # 14 LoRA modules (7 per layer), each reported with a finite delta norm
    assert len(result.modules) == 14 and all(m.kind == "lora" for m in result.modules)
    assert all(m.delta_fro is not None and m.delta_fro > 0 for m in result.modules)
    q = next(m for m in result.modules if m.name.endswith("0.self_attn.q_proj.weight"))
    assert q.delta_fro == pytest.approx(float(torch.linalg.norm(
        mine[q.name].double() - state_of(base)[q.name].double())), rel=1e-4)
    for name, text in EXTRA_FILES.items():  # non-weight files copied unchanged
        assert (out / name).read_text() == text
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((base / name).read_text())
    assert not (out / "model.safetensors.index.json").exists()
    assert leftovers(work, "merged") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_base_round_trips(work: Path, dtype: torch.dtype) -> None:
    tag = str(dtype).split(".")[1]
    kb = 100 if dtype == torch.float32 else 50  # ~4 shards of the 360 KB (f32) model
    base = make_base(work / f"sharded-{tag}", dtype=dtype, max_shard_size=f"{kb}KB", seed=3)
    adapter = make_adapter(base, work / f"sharded-adapter-{tag}", seed=4)
    assert len(list(base.glob("*.safetensors"))) >= 3
    out = unload(adapter, base, work / f"sharded-out-{tag}").out_dir
    assert shard_layout(out) == shard_layout(base)  # same files, keys, dtypes, shapes
    index, base_index = (json.loads((d / "model.safetensors.index.json").read_text())
                         for d in (out, base))
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    reference = logits(peft_model(base, adapter))
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (logits(load_model(out)) - reference).abs().max().item() <= tol
    # resharding: new file names, same tensors, loads to the same logits
    resharded = unload(adapter, base, work / f"resharded-{tag}", max_shard_size=f"{kb * 6 // 10}KB").out_dir
    files = sorted(p.name for p in resharded.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert state_of(resharded).keys() == state_of(out).keys()
    assert all(torch.equal(state_of(resharded)[k], v) for k, v in state_of(out).items())
    for path in resharded.glob("*.safetensors"):
        assert path.stat().st_size <= kb * 600 + 4096 or len(shard_layout(resharded)[path.name]) == 1


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_interrupted_unload_leaves_nothing(work: Path, base: Path, adapter: Path,
                                           error: type[BaseException]) -> None:
    seen: list[str] = []

    def fail_midway(name: str) -> None:
        seen.append(name)
        if len(seen) == 10:
            raise error()

    with pytest.raises(error):
        unload(adapter, base, work / "interrupted", on_tensor=fail_midway)
    assert len(seen) == 10
    assert not (work / "interrupted").exists()
    assert leftovers(work, "interrupted") == []


def test_existing_output_refused(work: Path, base: Path, adapter: Path) -> None:
    out = work / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError):
        unload(adapter, base, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_base_mismatch_refused_before_writing(work: Path, adapter: Path) -> None:
    other = make_base(work / "other-shape", hidden=96)
    with pytest.raises(BaseMismatchError, match=r"layers\.0\.mlp\.down_proj.*\(96, 192\)"):
        unload(adapter, other, work / "mismatch")
    assert not (work / "mismatch").exists() and leftovers(work, "mismatch") == []


def test_fingerprint_mismatch_refused(work: Path, base: Path, adapter: Path) -> None:
    same_shape = make_base(work / "same-shape-other-weights", seed=42)
    recorded = fingerprint_model(base).to_json()
    with pytest.raises(BaseMismatchError, match="other weights"):
        unload(adapter, same_shape, work / "wrong-weights", expected_fingerprint=recorded)
    assert not (work / "wrong-weights").exists() and leftovers(work, "wrong-weights") == []
    wrong_struct = {"struct_digest": "sha256:" + "0" * 64, "weights_digest": None}
    with pytest.raises(BaseMismatchError, match="structure"):
        unload(adapter, base, work / "wrong-struct", expected_fingerprint=wrong_struct)
    assert not (work / "wrong-struct").exists()
    ok = unload(adapter, base, work / "right-base", expected_fingerprint=recorded)
    assert ok.base_fingerprint == recorded


def test_nan_in_adapter_refused_with_module_named(work: Path, base: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = make_adapter(base, work / "nan-adapter", seed=7)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=r"layers\.1\.mlp\.up_proj.*NaN"):
        unload(bad, base, work / "nan-out")
    assert not (work / "nan-out").exists() and leftovers(work, "nan-out") == []


def test_modules_to_save_untied_embeddings(work: Path) -> None:
    base = make_base(work / "tied-base", tie=True, seed=5)
    assert "lm_head.weight" not in state_of(base)
    adapter = make_adapter(base, work / "tied-adapter", targets=("q_proj", "v_proj"),
                           modules_to_save=["lm_head"], seed=6)
    reference = peft_model(base, adapter)
    expected = logits(reference)
    result = unload(adapter, base, work / "tied-out")
    assert result.untied and any("untied" in n for n in result.notes)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    mine, original = state_of(result.out_dir), state_of(base)
    assert torch.equal(mine["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not torch.equal(mine["lm_head.weight"], original["model.embed_tokens.weight"])
    assert (logits(load_model(result.out_dir)) - expected).abs().max().item() <= 1e-5
    assert {m.kind for m in result.modules} == {"lora", "replaced"}


def test_embedding_lora_on_tied_base_unties(work: Path) -> None:
    base = make_base(work / "tied-base-2", tie=True, seed=8)
    adapter = make_adapter(base, work / "embed-adapter", targets=("embed_tokens", "q_proj"),
                           seed=9)
    expected = logits(peft_model(base, adapter))
    result = unload(adapter, base, work / "embed-out")
    assert result.untied
    mine, original = state_of(result.out_dir), state_of(base)
    # PEFT adapts the embedding only; the (formerly tied) head keeps the original matrix
    assert torch.equal(mine["lm_head.weight"], original["model.embed_tokens.weight"])
    assert (logits(load_model(result.out_dir)) - expected).abs().max().item() <= 1e-5


def test_lora_on_both_sides_of_a_tie_unties(work: Path) -> None:
    # found by a QA pass: PEFT saves base_layer copies of both targeted embeddings, equal to
    # the base, and the "both sides replaced by the same tensor" rule kept the tie, so the
    # lm_head LoRA was dropped
    base = make_base(work / "tied-base-3", tie=True, seed=11)
    adapter = make_adapter(base, work / "both-adapter", targets=("embed_tokens", "lm_head", "q_proj"),
                           seed=12)
    expected = logits(peft_model(base, adapter))
    result = unload(adapter, base, work / "both-out")
    assert result.untied
    mine, original = state_of(result.out_dir), state_of(base)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(mine[key], original["model.embed_tokens.weight"]), key
    assert not torch.equal(mine["lm_head.weight"], mine["model.embed_tokens.weight"])
    assert (logits(load_model(result.out_dir)) - expected).abs().max().item() <= 1e-5


def test_modules_to_save_on_untied_base(work: Path, base: Path) -> None:
    adapter = make_adapter(base, work / "mts-adapter", targets=("o_proj",),
                           modules_to_save=["lm_head", "embed_tokens"], seed=10)
    reference = peft_model(base, adapter)
    expected = logits(reference)
    merged = reference.merge_and_unload().state_dict()
    result = unload(adapter, base, work / "mts-out")
    assert not result.untied
    mine = state_of(result.out_dir)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(mine[key], merged[key])
    assert (logits(load_model(result.out_dir)) - expected).abs().max().item() <= 1e-5


def test_registry_ref_records_lineage(work: Path, base: Path, adapter: Path, capsys,
                                      cli_app: None) -> None:
    store = work / "store"
    assert run_json(capsys, "init", "--store", store)[0] == 0
    code, pushed = run_json(capsys, "push", adapter, "--name", "demo", "--base", base,
                            "--store", store)
    assert code == 0, pushed
    out = work / "from-store"
    code, data = run_json(capsys, "unload", "demo", "--base", base, "--out", out,
                          "--store", store)
    assert code == 0, data
    assert data["version"]["name"] == "demo-unloaded"
    assert data["output_fingerprint"] == fingerprint_model(out).to_json()
    assert data["base_fingerprint"] == fingerprint_model(base).to_json()
    code, shown = run_json(capsys, "show", data["version"]["ref"], "--store", store)
    assert code == 0, shown
    assert shown["kind"] == "model"
    assert shown["record"]["weights"] == data["output_fingerprint"]
    parents = shown["lineage"]["parents"]
    assert [p["digest"] for p in parents] == [pushed["version"]["digest"]]
    assert data["adapter_digest"] == pushed["version"]["digest"]
    # a base with the right shapes but other weights is refused, nothing written
    other = make_base(work / "store-other-base", seed=11)
    code, err = run_json(capsys, "unload", "demo", "--base", other, "--out", work / "nope",
                         "--store", store)
    assert code == 2 and err["error"] == "BaseMismatchError"
    assert not (work / "nope").exists() and leftovers(work, "nope") == []
    # human output names the recorded version
    code, text, _ = run(capsys, "unload", "demo", "--base", base, "--out", work / "again",
                        "--store", store)
    assert code == 0 and "demo-unloaded@sha256:" in text
    # an invalid --name is refused before the model is written (found by a QA pass: the
    # whole model was published at --out, then the name check failed at recording time)
    for argv in (["unload", "demo", "--base", base], ["quantize", out, "--to", "int8"]):
        code, err = run_json(capsys, *argv, "--out", work / "named", "--name", "../x",
                             "--store", store)
        assert code == 2 and "invalid name" in err["message"]
        assert not (work / "named").exists() and leftovers(work, "named") == []
    # an --out that is a symlink to an empty directory (found by a QA pass: the model was
    # written and recorded, then the rename failed on the link with exit 6, every time)
    (work / "link-target").mkdir()
    (work / "out-link").symlink_to(work / "link-target", target_is_directory=True)
    versions = len(Store.open(store).versions())
    for argv in (["unload", "demo", "--base", base], ["quantize", out, "--to", "int8"],
                 ["merge", "demo", "demo", "--method", "linear"]):
        code, err = run_json(capsys, *argv, "--out", work / "out-link", "--store", store)
        assert code == 4 and "symbolic link" in err["message"], err
    assert len(Store.open(store).versions()) == versions
    assert not any((work / "link-target").iterdir())
    # an --out inside the store (found by a QA pass: a model under names/ looked like the store's)
    inside = store / "names" / "evil"
    for argv in (["unload", "demo", "--base", base],
                 ["quantize", out, "--to", "int8", "--name", "q-inside"],  # recorded: store known
                 ["merge", "demo", "demo", "--method", "linear"], ["export", "demo"]):
        code, err = run_json(capsys, *argv, *(["--out"] if argv[0] != "export" else []), inside,
                             "--store", store)
        assert code == 2 and "is inside the store" in err["message"], err
    assert not inside.exists() and len(Store.open(store).versions()) == versions
    # one kind per name (found by a QA pass: a model under an adapter's name made `demo`
    # resolve to the model, and merge/export of `demo` failed); refused before writing
    code, err = run_json(capsys, "unload", "demo", "--base", base, "--out", work / "named",
                         "--name", "demo", "--store", store)
    assert code == 4 and "demo holds adapter versions" in err["message"]
    assert not (work / "named").exists() and leftovers(work, "named") == []


def test_shard_writer_streams_a_valid_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from merging.model.layout import parse_size
    from merging.model.shard_plan import OutTensor, plan_shards
    from merging.model.shard_writer import ShardWriter
    from registry.formats.safetensors_header import read_header

    tensors = {"b": torch.randn(300, 7).to(torch.bfloat16), "a": torch.arange(5, dtype=torch.int8),
               "s": torch.tensor(3.0), "odd": torch.randint(0, 9, (3,), dtype=torch.uint8)}
    # plan fewer tensors than written: the header outgrows its reservation, data shifts
    writer = ShardWriter(tmp_path / "x.safetensors", [OutTensor("a", "I8", (5,), 5)])
    for name, tensor in tensors.items():
        if name == "b":  # streamed in two pieces
            writer.begin(name, "BF16", tensor.shape)
            writer.write(tensor[:100])
            writer.write(tensor[100:])
            writer.end()
        else:
            writer.add(name, tensor)
    shard = writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    read_header(tmp_path / "x.safetensors")  # the registry's strict reader accepts it too
    assert shard.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(shard.tensor_sha256) == 4
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    with pytest.raises(BadInputError):
        parse_size("lots")
    units = [("f1", [OutTensor("t1", "F32", (10,), 40)]), ("f1", [OutTensor("t2", "F32", (30,), 120)]),
             ("f2", [OutTensor("t3", "F32", (10,), 40)])]
    assert [s.filename for s in plan_shards(units, max_shard_size=None)] == ["f1", "f2"]
    packed = plan_shards(units, max_shard_size=100)
    assert [[t.name for t in s.tensors] for s in packed] == [["t1"], ["t2"], ["t3"]]
    assert packed[0].filename == "model-00001-of-00003.safetensors"


def test_subfolders_copied_without_weights(work: Path, base: Path, adapter: Path) -> None:
    import shutil

    with_extras = work / "base-with-folders"
    shutil.copytree(base, with_extras)
    (with_extras / "original").mkdir()
    (with_extras / "original" / "consolidated.00.pth").write_bytes(b"x" * 100)
    (with_extras / "original" / "params.json").write_text("{}")
    (with_extras / "pytorch_model.bin").write_bytes(b"old")
    out = unload(adapter, with_extras, work / "folders-out").out_dir
    assert (out / "original" / "params.json").read_text() == "{}"
    assert not (out / "original" / "consolidated.00.pth").exists()
    assert not (out / "pytorch_model.bin").exists()


def test_a_killed_runs_staging_dir_is_removed_by_the_next_run(work: Path, base: Path,
                                                                adapter: Path) -> None:
    # found by a QA pass: a SIGKILLed unload left `.OUT.tmp-XXXXXXXX` (47 MB) beside OUT for ever
    import os
    import time

    stale, live, other = (work / ".out.tmp-abcd1234", work / ".out.tmp-live0000",
                          work / ".elsewhere.tmp-abcd1234")
    for path in (stale, live, other):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 7200  # idle for two hours: its writer is gone
    for path in (stale, stale / "model.safetensors", other, other / "model.safetensors"):
        os.utime(path, (old, old))
    unload(adapter, base, work / "out")
    assert not stale.exists()
    assert live.exists() and other.exists()  # still being written; another OUT's
    assert (work / "out" / "config.json").is_file()
