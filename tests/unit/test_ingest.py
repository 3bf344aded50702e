"""prepare_adapter: validated PEFT directories in, clear refusals for everything else."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.errors import BadInputError, BaseMismatchError, NotFoundError, UnsupportedAdapterError
from registry.ingest import prepare_adapter
from registry.formats.peft_keys import (
    base_key_for_extra,
    base_weight_key,
    rank_for,
    split_keys,
)
from registry.record import TensorSummary, build_record
from tests.support.ingest import INGEST_LLAMA, save_adapter
from tests.support.tiny_llama import save_tiny_llama, tiny_llama

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    return {
        "base": save_tiny_llama(root / "base", INGEST_LLAMA),
        "base_sharded": save_tiny_llama(root / "base_sharded", INGEST_LLAMA, max_shard_size="8KB"),
        "base_wide": save_tiny_llama(root / "base_wide", INGEST_LLAMA, intermediate_size=48),
        "base_1layer": save_tiny_llama(root / "base_1layer", INGEST_LLAMA, num_hidden_layers=1),
        "base_tied": save_tiny_llama(root / "base_tied", INGEST_LLAMA, tie_word_embeddings=True),
        "plain": save_adapter(root / "plain"),
        "mlp": save_adapter(root / "mlp", target_modules=("up_proj", "down_proj")),
        "rank_pattern": save_adapter(
            root / "rank_pattern",
            target_modules=("q_proj", "k_proj"),
            rank_pattern={"k_proj": 2},
            alpha_pattern={"k_proj": 4},
        ),
        "dora": save_adapter(root / "dora", target_modules=("q_proj",), use_dora=True),
        "bias": save_adapter(root / "bias", target_modules=("q_proj",), lora_bias=True),
        "emb": save_adapter(
            root / "emb", target_modules=("embed_tokens", "q_proj"), modules_to_save=["lm_head"]
        ),
        "tied_head": save_adapter(
            root / "tied_head", target_modules=("lm_head",), base_overrides={"tie_word_embeddings": True}
        ),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


# --- peft_keys -------------------------------------------------------------------------


def test_peft_key_forms_saved_by_peft_are_grouped(built):
    names = load_file(str(built["emb"] / "adapter_model.safetensors")).keys()
    modules, extras = split_keys(names)
    emb = modules["base_model.model.model.embed_tokens"]
    assert emb.embedding and emb.a.endswith("lora_embedding_A") and emb.b.endswith("lora_embedding_B")
    assert not modules[Q].embedding and modules[Q].a == Q + ".lora_A.weight"
    assert extras == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.base_layer.weight"]
    assert [base_key_for_extra(e) for e in extras] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert base_key_for_extra("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    dora = split_keys(load_file(str(built["dora"] / "adapter_model.safetensors")).keys())[0]
    assert dora[Q].magnitude == Q + ".lora_magnitude_vector"
    assert split_keys([Q + ".lora_A.weight", Q + ".lora_B.weight", Q + ".lora_magnitude_vector.weight"])[0][Q].magnitude
    bias = split_keys(load_file(str(built["bias"] / "adapter_model.safetensors")).keys())[0]
    assert bias[Q].bias == Q + ".lora_B.bias"
    assert base_weight_key(Q) == "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "names, fragment",
    [
        ([Q + ".lora_A.default.weight", Q + ".lora_B.default.weight"], "unrecognized LoRA key"),
        ([Q + ".lora_A.weight"], "B tensor missing"),
        ([Q + ".lora_B.weight"], "A tensor missing"),
        ([Q + ".lora_A.weight", Q + ".lora_B.weight", Q + ".lora_embedding_A"], "mixes"),
        ([Q + ".lora_A.weight", Q + ".lora_B.weight", Q + ".lora_magnitude_vector", Q + ".lora_magnitude_vector.weight"], "duplicates"),
    ],
)
def test_malformed_peft_keys_are_refused(names, fragment):
    with pytest.raises(BadInputError, match=fragment):
        split_keys(names)


def test_rank_pattern_matches_like_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"k_proj": 2, r"layers\.1\.self_attn\.q_proj": 3, "mlp.*": 5}
    for module in (
        "base_model.model.model.layers.0.self_attn.k_proj",
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.0.self_attn.q_proj",
        "base_model.model.model.layers.0.mlp.up_proj",
        "base_model.model.model.layers.0.self_attn.kk_proj",
    ):
        name = module[len("base_model.model."):]
        key = get_pattern_key(list(patterns), name)
        assert rank_for(module, 8, patterns) == patterns.get(key, 8), module


@pytest.mark.parametrize("pattern", ["(?=q)", r"(q)\1", "(", "x" * 70_000])
def test_invalid_or_non_linear_patterns_are_refused(pattern):
    with pytest.raises(BadInputError, match="rank_pattern"):
        rank_for(Q, 4, {pattern: 2})


@pytest.mark.parametrize("pattern", ["(a+)+b", "(.*)*", ".*.*.*.*x"])
def test_backtracking_patterns_are_matched_in_linear_time(pattern):
    # RE2 runs them (registry/formats/patterns.py); they no longer need refusing
    from peft.utils.other import get_pattern_key

    expected = {pattern: 2}.get(get_pattern_key([pattern], Q[len("base_model.model."):]), 4)
    assert rank_for(Q, 4, {pattern: 2}) == expected


# --- prepare_adapter: accepted inputs ------------------------------------------------------


def test_plain_adapter_is_prepared(built):
    prepared = prepare_adapter(built["plain"], base_dir=built["base"])
    assert sorted(prepared.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert all(p.is_file() for p in prepared.files.values())
    assert prepared.workdir is None
    assert prepared.peft_config["r"] == 4 and prepared.peft_config["peft_type"] == "LORA"
    tensors = load_file(str(built["plain"] / "adapter_model.safetensors"))
    assert prepared.tensors == TensorSummary(
        count=len(tensors), dtypes={"F32": len(tensors)}, parameters=sum(t.numel() for t in tensors.values())
    )
    record = build_record(prepared.peft_config, prepared.tensors)
    assert record["tensors"]["count"] == 8 and record["peft"]["r"] == 4


def test_sharded_base_and_no_base_are_accepted(built):
    assert prepare_adapter(built["plain"], base_dir=built["base_sharded"]).tensors.count == 8
    assert prepare_adapter(built["mlp"]).tensors.count == 8


@pytest.mark.parametrize("kind", ["rank_pattern", "dora", "bias", "emb"])
def test_peft_variants_are_accepted_with_base_check(built, kind):
    prepared = prepare_adapter(built[kind], base_dir=built["base"])
    assert prepared.tensors.count == len(load_file(str(built[kind] / "adapter_model.safetensors")))


def test_lora_on_tied_lm_head_checks_against_embeddings(built):
    assert "lm_head.weight" not in load_file(str(built["base_tied"] / "model.safetensors"))
    prepare_adapter(built["tied_head"], base_dir=built["base_tied"])
    with pytest.raises(BaseMismatchError, match="no weight 'lm_head.weight'"):
        prepare_adapter(built["tied_head"], base_dir=_untied_copy(built["base_tied"]))


def _untied_copy(base: Path) -> Path:
    out = base.parent / "base_tied_flag_off"
    if not out.exists():
        shutil.copytree(base, out)
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_other_files_are_ignored_and_symlinks_inside_followed(built, tmp_path):
    adapter = _copy(built["plain"], tmp_path / "a")
    (adapter / "training_args.bin").write_bytes(b"\x80 pickle")
    (adapter / "optimizer.pt").write_bytes(b"x")
    os.rename(adapter / "README.md", adapter / "card.md")
    (adapter / "README.md").symlink_to("card.md")
    prepared = prepare_adapter(adapter)
    assert sorted(prepared.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert prepared.files["README.md"] == (adapter / "card.md").resolve()


# --- prepare_adapter: refusals -----------------------------------------------------------


def test_base_shape_mismatch_names_the_first_module_and_both_shapes(built):
    with pytest.raises(BaseMismatchError) as info:
        prepare_adapter(built["mlp"], base_dir=built["base_wide"])
    message = info.value.message
    assert "base_model.model.model.layers.0.mlp.down_proj" in message
    assert "(16, 32)" in message and "(16, 48)" in message
    assert info.value.exit_code == 2 and info.value.fix


def test_module_missing_in_base_is_refused(built):
    with pytest.raises(BaseMismatchError, match=r"layers\.1\..*no weight"):
        prepare_adapter(built["plain"], base_dir=built["base_1layer"])


def test_modules_to_save_shape_checked_against_base(built, tmp_path):
    adapter = _copy(built["emb"], tmp_path / "emb")
    _edit_tensors(adapter, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(65, 16)))
    with pytest.raises(BaseMismatchError, match="lm_head"):
        prepare_adapter(adapter, base_dir=built["base"])


def test_missing_base_dir(built, tmp_path):
    with pytest.raises(NotFoundError):
        prepare_adapter(built["plain"], base_dir=tmp_path / "nope")


def test_bin_adapter_refused_by_default_and_converted_with_allow_pickle(built, tmp_path):
    adapter = _copy(built["plain"], tmp_path / "bin")
    original = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(original, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(BadInputError) as info:
        prepare_adapter(adapter)
    assert "adapter_model.bin" in info.value.message and "--allow-pickle" in info.value.fix
    work = tmp_path / "work"
    work.mkdir()
    with prepare_adapter(adapter, allow_pickle=True, base_dir=built["base"], workdir_parent=work) as prepared:
        converted = prepared.files["adapter_model.safetensors"]
        assert prepared.workdir is not None and converted.parent == prepared.workdir
        assert prepared.workdir.parent == work
        loaded = load_file(str(converted))
        assert loaded.keys() == original.keys()
        assert all(torch.equal(loaded[k], original[k]) for k in original)
        assert prepared.tensors.count == len(original)
        # the converted directory loads in peft and computes what the original does
        from peft import PeftModel

        converted_dir = tmp_path / "converted"
        converted_dir.mkdir()
        for name, path in prepared.files.items():
            shutil.copy(path, converted_dir / name)
        ids = torch.tensor([[1, 5, 9, 3]])
        with torch.no_grad():
            want = PeftModel.from_pretrained(tiny_llama(INGEST_LLAMA), built["plain"])(ids).logits
            got = PeftModel.from_pretrained(tiny_llama(INGEST_LLAMA), converted_dir)(ids).logits
        assert torch.equal(want, got)
    assert not prepared.workdir.exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_workdir_removed(built, tmp_path, monkeypatch):
    adapter = _copy(built["plain"], tmp_path / "evil")
    (adapter / "adapter_model.safetensors").unlink()
    with open(adapter / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match="weights_only"):
        prepare_adapter(adapter, allow_pickle=True, workdir_parent=work)
    assert not (tmp_path / "pwned").exists()
    assert list(work.iterdir()) == []
    (adapter / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(BadInputError):
        prepare_adapter(adapter, allow_pickle=True, workdir_parent=work)
    torch.save([torch.zeros(2)], adapter / "adapter_model.bin")
    with pytest.raises(BadInputError, match="state dict"):
        prepare_adapter(adapter, allow_pickle=True, workdir_parent=work)
    assert list(work.iterdir()) == []


def test_symlink_outside_the_directory_is_refused(built, tmp_path):
    adapter = _copy(built["plain"], tmp_path / "a")
    outside = tmp_path / "outside.safetensors"
    shutil.move(adapter / "adapter_model.safetensors", outside)
    (adapter / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(BadInputError, match="outside the adapter directory"):
        prepare_adapter(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    shutil.move(outside, adapter / "adapter_model.safetensors")
    (adapter / "README.md").unlink()
    (adapter / "README.md").symlink_to("/etc/passwd")
    with pytest.raises(BadInputError, match="outside"):
        prepare_adapter(adapter)
    (adapter / "README.md").unlink()
    (adapter / "README.md").symlink_to("README.md")  # loop
    with pytest.raises(BadInputError, match="symlink"):
        prepare_adapter(adapter)
    (adapter / "README.md").unlink()
    (adapter / "README.md").mkdir()
    with pytest.raises(BadInputError, match="regular file"):
        prepare_adapter(adapter)


def test_missing_pieces(built, tmp_path):
    with pytest.raises(NotFoundError):
        prepare_adapter(tmp_path / "nope")
    adapter = _copy(built["plain"], tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(BadInputError, match="no adapter_model.safetensors"):
        prepare_adapter(adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(BadInputError, match="no adapter_config.json") as info:
        prepare_adapter(adapter)
    assert info.value.fix


@pytest.mark.parametrize(
    "changes, error, fragment",
    [
        ({"peft_type": "IA3"}, UnsupportedAdapterError, "not supported"),
        ({"peft_type": None}, BadInputError, "peft_type"),
        ({"r": 0}, BadInputError, "r must be"),
        ({"r": "4"}, BadInputError, "r must be"),
        ({"r": True}, BadInputError, "r must be"),
        ({"r": 8}, BadInputError, "config gives 8"),
        ({"lora_alpha": "x"}, BadInputError, "lora_alpha"),
        ({"lora_alpha": None}, BadInputError, "lora_alpha"),
        ({"lora_alpha": 10**400}, BadInputError, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 10**400}}, BadInputError, "alpha_pattern"),
        ({"target_modules": 5}, BadInputError, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, BadInputError, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, BadInputError, "rank_pattern"),
        ({"rank_pattern": {"q_proj": 2}}, BadInputError, "config gives 2"),
        ({"rank_pattern": {"(": 2}}, BadInputError, "not a valid pattern"),
        ({"alpha_pattern": {"q": "x"}}, BadInputError, "alpha_pattern"),
        ({"use_dora": "yes"}, BadInputError, "use_dora"),
        ({"use_dora": True}, BadInputError, "magnitude vector is missing"),
        ({"bias": "some"}, BadInputError, "bias"),
        ({"modules_to_save": "lm_head"}, BadInputError, "modules_to_save"),
        ({"lora_dropout": 2}, BadInputError, "lora_dropout"),
        ({"task_type": 1}, BadInputError, "task_type"),
    ],
)
def test_config_errors_name_the_field(built, tmp_path, changes, error, fragment):
    adapter = _copy(built["plain"], tmp_path / "a")
    _edit_config(adapter, **changes)
    with pytest.raises(error, match=fragment) as info:
        prepare_adapter(adapter)
    assert "\n" not in info.value.message and info.value.fix


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"r": 4, "r": 5}', "duplicate"),
        ('{"lora_alpha": NaN}', "NaN"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"r": ' + "9" * 10_000 + "}", "not valid JSON"),
    ],
)
def test_unparseable_configs(built, tmp_path, text, fragment):
    adapter = _copy(built["plain"], tmp_path / "a")
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(BadInputError, match=fragment):
        prepare_adapter(adapter)
    (adapter / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(BadInputError, match="not UTF-8"):
        prepare_adapter(adapter)


def test_dora_and_bias_tensors_must_be_declared(built, tmp_path):
    adapter = _copy(built["dora"], tmp_path / "dora")
    _edit_config(adapter, use_dora=False)
    with pytest.raises(BadInputError, match="use_dora is not true"):
        prepare_adapter(adapter)
    adapter = _copy(built["bias"], tmp_path / "bias")
    _edit_config(adapter, lora_bias=False)
    with pytest.raises(BadInputError, match="lora_bias is not true"):
        prepare_adapter(adapter)


@pytest.mark.parametrize(
    "edit, error, fragment",
    [
        (lambda t: t.__setitem__(Q + ".lora_B.weight", torch.zeros(16, 3)), BadInputError, "disagree on the rank"),
        (lambda t: t.__setitem__(Q + ".lora_A.weight", torch.zeros(4, 16, dtype=torch.int32)), BadInputError, "not a float"),
        (lambda t: t.__setitem__(Q + ".lora_A.weight", torch.zeros(4, 16, 1, 1)), UnsupportedAdapterError, "convolution"),
        (lambda t: t.__setitem__(Q + ".lora_A.weight", torch.zeros(4)), BadInputError, "must be 2-D"),
        (lambda t: t.pop(Q + ".lora_B.weight"), BadInputError, "B tensor missing"),
        (lambda t: t.__setitem__(Q + ".lora_A.default.weight", torch.zeros(4, 16)), BadInputError, "unrecognized"),
        (lambda t: [t.pop(k) for k in list(t)] and t.__setitem__("x", torch.zeros(1)), BadInputError, "no LoRA tensors"),
    ],
)
def test_tensor_errors(built, tmp_path, edit, error, fragment):
    adapter = _copy(built["plain"], tmp_path / "a")
    _edit_tensors(adapter, edit)
    with pytest.raises(error, match=fragment):
        prepare_adapter(adapter)


def test_corrupt_safetensors_is_refused(built, tmp_path):
    adapter = _copy(built["plain"], tmp_path / "a")
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BadInputError, match="adapter_model.safetensors: not a valid safetensors"):
        prepare_adapter(adapter)


def test_handmade_fixture_matches_what_peft_writes(built, tmp_path):
    """tests.support.ingest.handmade_adapter (used by the torch-free fuzz tests) stays honest."""
    from safetensors import safe_open

    from tests.support.ingest import handmade_adapter

    real = save_adapter(tmp_path / "real", target_modules=("q_proj",))
    fake = handmade_adapter(tmp_path / "fake")

    def view(adapter):
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="numpy") as f:
            return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()

    assert view(real) == view(fake)
    real_cfg = json.loads((real / "adapter_config.json").read_text())
    fake_cfg = json.loads((fake / "adapter_config.json").read_text())
    assert {k: real_cfg.get(k) for k in fake_cfg if k != "base_model_name_or_path"} == {
        k: v for k, v in fake_cfg.items() if k != "base_model_name_or_path"
    }
    prepare_adapter(fake, base_dir=built["base"])


def test_registry_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import registry.formats.safetensors_header, registry.formats.fingerprint, registry.formats.peft_keys, registry.ingest\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'safetensors', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
