"""The rewrite's two pipelines and its durability switch, end to end.

A plain unload takes the fast path (workers write their row ranges in place); a
recorded one hashes bytes in order (the ordered path). Both must write the same
bytes; the bfloat16 way must stay within rounding of the float32 way; ``sync=False``
must skip every fsync and nothing else. Row ranges are made tiny here so every
tensor is split into many ranges that finish out of order.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
import torch

from merging.model import pipeline as rewrite
from merging.model import rowmerge
from merging.model.unload import unload
from registry.errors import BadInputError
from registry.formats.fingerprint import fingerprint_model
from registry.storage.store import Store
from tests.support.cli import run_json
from tests.support.unload import (leftovers, load_model, logits, make_adapter, make_base,
                                   peft_model, state_of)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def tiny_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewrite, "MERGE_CHUNK_BYTES", 1024)  # 4 rows of a 64-wide weight
    monkeypatch.setattr(rewrite, "FAST_CHUNK_BYTES", 1024)
    monkeypatch.setattr(rewrite, "TASK_BYTES", 3 * 1024)  # tasks of 3 ranges


@pytest.fixture(scope="module")
def bf16_base(work: Path) -> Path:
    return make_base(work / "bf16-base", dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_and_ordered_paths_write_the_same_bytes(work: Path, base: Path, bf16_base: Path,
                                                     dtype: str) -> None:
    model = base if dtype == "float32" else bf16_base
    adapter = make_adapter(model, work / f"paths-adapter-{dtype}", seed=6)
    fast = unload(adapter, model, work / f"fast-{dtype}")
    store = Store.open(work / f"paths-store-{dtype}", create=True)
    ordered = unload(adapter, model, work / f"ordered-{dtype}", store=store, name="paths")
    assert ordered.output_fingerprint == fingerprint_model(ordered.out_dir).to_json()
    mine, theirs = state_of(fast.out_dir), state_of(ordered.out_dir)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [m.to_json() for m in fast.modules] == [m.to_json() for m in ordered.modules]
    tol = 1e-5 if dtype == "float32" else 0.05
    assert (logits(load_model(fast.out_dir)) - logits(peft_model(model, adapter))).abs().max() \
        <= tol


def test_bf16_way_within_rounding_of_float32_way(work: Path, bf16_base: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(bf16_base, work / "ways-adapter", seed=8)
    outs = {}
    for way in (True, False):
        monkeypatch.setattr(rowmerge, "BF16_GEMM", way)
        outs[way] = state_of(unload(adapter, bf16_base, work / f"way-{way}").out_dir)
    base_state = state_of(bf16_base)
    changed = [k for k in outs[True] if not torch.equal(outs[False][k], base_state[k])]
    assert len(changed) == 14  # 7 targets x 2 layers, merged both ways
    for key in changed:
        fast, slow = outs[True][key], outs[False][key]
        assert float((fast != slow).float().mean()) <= 5e-3, key
        # where they differ: one bfloat16 step of the value, or a hair of the weight's
        # scale where the merge cancels to near zero
        step = slow.float().abs() * 2**-7 + 2**-14 * float(slow.float().abs().max())
        assert bool(((fast.float() - slow.float()).abs() <= step).all()), key


def test_no_sync_skips_every_fsync(work: Path, base: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main as cli_main, unload_cmds

    import typer

    if "unload" not in typer.main.get_command(cli_main.app).commands:  # type: ignore[attr-defined]
        unload_cmds.register(cli_main.app)
    adapter = make_adapter(base, work / "sync-adapter", seed=9)
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    kicks: list[tuple[int, int]] = []

    def recording_writeback(fd: int, offset: int, count: int, flags: int) -> int:
        kicks.append((offset, count))
        return 0

    from merging.model import shard_writer

    monkeypatch.setattr(os, "fsync", counting_fsync)
    monkeypatch.setattr(shard_writer, "_sync_file_range", recording_writeback)
    durable = unload(adapter, base, work / "synced")
    assert len(calls) >= 2  # the shard and the parent directory
    assert kicks and all(count > 0 for _, count in kicks)  # writeback started per range
    calls.clear()
    kicks.clear()
    code, data = run_json(capsys, "unload", adapter, "--base", base, "--out",
                          work / "unsynced", "--no-sync")
    assert code == 0, data
    assert calls == [] and kicks == []
    a, b = state_of(durable.out_dir), state_of(work / "unsynced")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overflow_in_a_row_range_refused_nothing_written(work: Path) -> None:
    f16 = make_base(work / "f16-base", dtype=torch.float16, seed=12)
    loud = make_adapter(f16, work / "loud-adapter", seed=13, std=100.0)  # deltas past 65504
    with pytest.raises(BadInputError, match=r"NaN/Inf values \(module .*\)"):
        unload(loud, f16, work / "overflow-out")
    assert not (work / "overflow-out").exists() and leftovers(work, "overflow-out") == []


def test_interrupt_waits_for_workers_then_cleans_up(work: Path, base: Path) -> None:
    adapter = make_adapter(base, work / "stop-adapter", seed=14)
    seen: list[str] = []

    def stop_at_third(name: str) -> None:
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unload(adapter, base, work / "stopped", on_tensor=stop_at_third)
    assert not (work / "stopped").exists() and leftovers(work, "stopped") == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("merge")] == []


def test_writer_reserved_ranges_filled_out_of_order(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from merging.model.shard_writer import ShardWriter
    from merging.model.shard_plan import OutTensor

    tensors = {"w": torch.randn(40, 8), "x": torch.arange(6, dtype=torch.int16),
               "v": torch.randn(9, 3).to(torch.bfloat16)}
    planned = [OutTensor(k, {torch.float32: "F32", torch.int16: "I16", torch.bfloat16: "BF16"}[
        t.dtype], tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    writer = ShardWriter(tmp_path / "r.safetensors", planned, hash_tensors=False)
    offset = writer.reserve("w", "F32", (40, 8))
    writer.add("x", tensors["x"])  # an ordered write between reserved ones
    v_offset = writer.reserve("v", "BF16", (9, 3))
    pieces = [(offset + r * 32, tensors["w"][r:r + 5]) for r in range(35, -1, -5)]
    pieces.append((v_offset, tensors["v"]))
    with ThreadPoolExecutor(3) as pool:  # last rows first, from several threads
        list(pool.map(lambda p: writer.write_at(*p), pieces))
    writer.close()
    loaded = load_file(tmp_path / "r.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    hashing = ShardWriter(tmp_path / "h.safetensors", planned)
    with pytest.raises(RuntimeError, match="hash_tensors"):
        hashing.reserve("w", "F32", (40, 8))
    hashing.abort()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_weights_in_many_ranges(work: Path, dtype: torch.dtype) -> None:
    """GPT-2 keeps ``(in, out)`` Conv1D weights (``fan_in_fan_out``) and an adapted
    embedding is transposed too: their row ranges are columns of ``A``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    tag = str(dtype).split(".")[1]
    torch.manual_seed(21)
    base_dir = work / f"gpt2-{tag}"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
                    ).to(dtype).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
        fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(work / f"gpt2-adapter-{tag}")
    out = unload(work / f"gpt2-adapter-{tag}", base_dir, work / f"gpt2-out-{tag}").out_dir
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype),
        str(work / f"gpt2-adapter-{tag}")).eval()
    mine = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    with torch.no_grad():
        diff = (mine(ids).logits.float() - reference(ids).logits.float()).abs().max().item()
    assert diff <= (1e-5 if dtype == torch.float32 else 0.05)


def test_worker_failure_cleans_up(work: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read failing inside a worker (the base changed under us) surfaces as the
    command's error; the staged output is removed and no worker outlives the call."""
    from merging.model.layout import TensorReader

    adapter = make_adapter(base, work / "fail-adapter", seed=15)
    real_read = TensorReader.read
    calls = {"n": 0}

    def flaky_read(self, src, row_start=0, row_end=None, buffer=None):  # noqa: ANN001, ANN202
        if threading.current_thread().name.startswith("merge"):
            calls["n"] += 1
            if calls["n"] == 7:
                raise BadInputError(f"{src.file}: file changed while reading {src.name}",
                                    fix="make sure nothing writes the base model while unloading")
        return real_read(self, src, row_start, row_end, buffer)

    monkeypatch.setattr(TensorReader, "read", flaky_read)
    with pytest.raises(BadInputError, match="file changed while reading"):
        unload(adapter, base, work / "failed")
    assert calls["n"] >= 7
    assert not (work / "failed").exists() and leftovers(work, "failed") == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("merge")] == []


@pytest.mark.parametrize("recorded", [False, True], ids=["fast", "ordered"])
def test_nan_in_lora_a_refused_on_both_paths(work: Path, recorded: bool) -> None:
    """LoRA factors are checked as each module's are read (not in a pass before): the
    refusal still names the module and the factor, on a sharded base, and leaves
    nothing behind."""
    from safetensors.torch import load_file, save_file

    sharded = make_base(work / f"nan-base-{recorded}", max_shard_size="40KB", seed=16)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    bad = make_adapter(sharded, work / f"nan-a-adapter-{recorded}", seed=17)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"][0, 5] = \
        float("inf")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    store = Store.open(work / f"nan-store-{recorded}", create=True) if recorded else None
    out = work / f"nan-a-out-{recorded}"
    with pytest.raises(BadInputError,
                       match=r"module .*layers\.1\.self_attn\.o_proj has NaN/Inf values in lora_A"):
        unload(bad, sharded, out, store=store, name="nan" if store else None)
    assert not out.exists() and leftovers(work, out.name) == []


def test_delta_norm_survives_float32_gram_overflow(work: Path, base: Path) -> None:
    """Finite factors whose float32 Gram products overflow are not refused; the delta
    norm is recomputed in float64 and matches ``||s·B·A||_F`` computed directly."""
    from safetensors.torch import load_file, save_file

    from merging.adapter import load_adapter

    big = make_adapter(base, work / "big-adapter", seed=18)
    tensors = load_file(big / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[f"{key}.lora_A.weight"] *= 1e21  # (A A^T) ~ 1e42 > float32 max
    save_file(tensors, big / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter = load_adapter(big)
    info = adapter.infos[key]
    run = rewrite.Rewrite(adapter, None, None, hash_base=False, collect=False, progress=None,
                          on_tensor=None)
    try:
        a, b, scale, delta_fro = run.factors(info)
    finally:
        run.close()
    expected = float((scale * b.double() @ a.double()).norm())
    assert math.isfinite(delta_fro) and delta_fro == pytest.approx(expected, rel=1e-9)


def test_adapter_digest_only_when_recorded(work: Path, base: Path) -> None:
    """An unrecorded unload hashes nothing, the adapter included; recording an adapter
    directory puts the digest of its two files in the result and the lineage."""
    import hashlib

    from registry.digests import json_digest

    adapter = make_adapter(base, work / "digest-adapter", seed=19)
    assert unload(adapter, base, work / "digest-plain").adapter_digest is None
    store = Store.open(work / "digest-store", create=True)
    recorded = unload(adapter, base, work / "digest-recorded", store=store, name="digested")
    files = {name: "sha256:" + hashlib.sha256((adapter / name).read_bytes()).hexdigest()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert recorded.adapter_digest == json_digest(files)
    lineage = store.resolve(recorded.version["ref"]).lineage
    assert lineage is not None and lineage["report"]["adapter_digest"] == recorded.adapter_digest


def test_shards_written_a_few_at_a_time_match(work: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """With fewer writers open than shards (``OPEN_SHARDS``), the output is the same
    bytes in the same files as with all of them open."""
    from merging.model import execute

    many = make_base(work / "many-shards", max_shard_size="30KB", seed=20)
    assert len(list(many.glob("*.safetensors"))) >= 5
    adapter = make_adapter(many, work / "many-adapter", seed=21)
    together = unload(adapter, many, work / "many-together")
    monkeypatch.setattr(execute, "OPEN_SHARDS", 2)
    open_now, most = set(), [0]
    real_init, real_abort = execute.ShardWriter.__init__, execute.ShardWriter.abort

    def tracked_init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real_init(self, *args, **kwargs)
        open_now.add(id(self))
        most[0] = max(most[0], len(open_now))

    def tracked_abort(self):  # noqa: ANN001, ANN202
        open_now.discard(id(self))
        real_abort(self)

    monkeypatch.setattr(execute.ShardWriter, "__init__", tracked_init)
    monkeypatch.setattr(execute.ShardWriter, "abort", tracked_abort)
    in_pairs = unload(adapter, many, work / "many-pairs")
    assert most[0] == 2 and not open_now
    assert together.files == in_pairs.files
    for name in together.files:
        assert (together.out_dir / name).read_bytes() == (in_pairs.out_dir / name).read_bytes()


def test_rows_longer_than_a_range_buffer(work: Path, base: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A row longer than the fast path's range size still merges (its buffer grows):
    the same tensors as with ranges of many rows, up to float32 rounding (the matmul
    may sum in another order for another number of rows)."""
    adapter = make_adapter(base, work / "long-rows-adapter", seed=22)
    reference = state_of(unload(adapter, base, work / "long-rows-ref").out_dir)
    monkeypatch.setattr(rewrite, "FAST_CHUNK_BYTES", 64)  # a 64-wide float32 row is 256
    tiny = state_of(unload(adapter, base, work / "long-rows-tiny").out_dir)
    assert reference.keys() == tiny.keys()
    for key, tensor in reference.items():
        assert tiny[key].dtype == tensor.dtype
        torch.testing.assert_close(tiny[key], tensor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [["a"], 5, None, {"x": 1}])
def test_an_index_mapping_a_tensor_to_a_non_name_is_bad_input(work: Path, base: Path, value) -> None:
    # found by a QA pass: a list or number in weight_map crashed unload, quantize and
    # rebuild with a TypeError (exit 70) before any shard was read
    import json
    import shutil

    from merging.model.layout import read_layout

    model = work / f"odd-index-{type(value).__name__}"
    shutil.copytree(base, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    names = list(state_of(base))
    weight_map = {name: "model-00001-of-00001.safetensors" for name in names}
    weight_map[names[0]] = value
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BadInputError, match="malformed index .*not a shard file name"):
        read_layout(model)


def test_a_checkpoint_of_several_float_dtypes_is_refused(work: Path, base: Path) -> None:
    # found by a QA pass: a bfloat16 shard in a float32 model was rewritten tensor by tensor
    # in its own dtype, where transformers (and so PEFT and the quantizer) casts to one
    import shutil

    from safetensors.torch import load_file, save_file

    model = work / "mixed-dtypes"
    shutil.copytree(base, model)
    tensors = load_file(model / "model.safetensors")
    norm = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[norm] = tensors[norm].to(torch.bfloat16)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(base, work / "mixed-adapter", seed=21)
    with pytest.raises(BadInputError, match=r"tensors of several dtypes: .*BF16"):
        unload(adapter, model, work / "mixed-out")
    assert not (work / "mixed-out").exists() and leftovers(work, "mixed-out") == []
