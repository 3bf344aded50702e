"""Base-model fingerprints: stable across file layout, sensitive to weights and structure."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from registry.digests import canonical_json
from registry.errors import BadInputError, NotFoundError
from registry.formats.fingerprint import (
    ARCH_FIELDS,
    fingerprint_model,
    model_weight_shapes,
    model_weights,
)
from registry.formats.safetensors_header import read_header
from tests.support.ingest import INGEST_LLAMA
from tests.support.tiny_llama import save_tiny_llama, tiny_llama

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "single": save_tiny_llama(root / "single", INGEST_LLAMA, seed=0),
        "sharded": save_tiny_llama(root / "sharded", INGEST_LLAMA, seed=0, max_shard_size="8KB"),
        "sharded2": save_tiny_llama(root / "sharded2", INGEST_LLAMA, seed=0, max_shard_size="16KB"),
        "other_seed": save_tiny_llama(root / "other_seed", INGEST_LLAMA, seed=1),
        "wider": save_tiny_llama(root / "wider", INGEST_LLAMA, seed=0, intermediate_size=48),
    }


@pytest.fixture(scope="module")
def single_fp(bases):
    return fingerprint_model(bases["single"])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_digest_format_and_headers_only_mode(bases, single_fp):
    assert DIGEST.match(single_fp.struct_digest) and DIGEST.match(single_fp.weights_digest)
    quick = fingerprint_model(bases["single"], weights=False)
    assert quick.struct_digest == single_fp.struct_digest and quick.weights_digest is None
    assert single_fp.to_json() == {
        "struct_digest": single_fp.struct_digest,
        "weights_digest": single_fp.weights_digest,
    }


def test_definition_of_both_digests_is_pinned(bases, single_fp):
    """Recompute both digests from safetensors' own view, as DESIGN.md defines them."""
    path = bases["single"] / "model.safetensors"
    config = json.loads((bases["single"] / "config.json").read_text())
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    struct = {
        "v": 1,
        "tensors": [[k, list(tensors[k].shape)] for k in sorted(tensors)],
        "config": {k: config[k] for k in ARCH_FIELDS if k in config},
    }
    weights = {
        "v": 1,
        "tensors": [
            [
                k,
                dtypes[k],
                list(tensors[k].shape),
                hashlib.sha256(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
            ]
            for k in sorted(tensors)
        ],
    }
    assert single_fp.struct_digest == "sha256:" + hashlib.sha256(canonical_json(struct)).hexdigest()
    assert single_fp.weights_digest == "sha256:" + hashlib.sha256(canonical_json(weights)).hexdigest()


def test_sharded_equals_unsharded(bases, single_fp):
    shards = sorted(p.name for p in bases["sharded"].glob("*.safetensors"))
    assert len(shards) > 1, shards
    assert fingerprint_model(bases["sharded"]) == single_fp
    assert fingerprint_model(bases["sharded2"]) == single_fp
    assert model_weight_shapes(bases["sharded"]) == model_weight_shapes(bases["single"])


def test_resaved_file_with_other_order_and_metadata_is_equal(bases, single_fp, tmp_path):
    out = _copy(bases["single"], tmp_path / "resaved")
    tensors = load_file(str(out / "model.safetensors"))
    reordered = {k: tensors[k].clone() for k in sorted(tensors, reverse=True)}
    save_file(reordered, str(out / "model.safetensors"), metadata={"format": "pt", "by": "test"})
    assert fingerprint_model(out) == single_fp


def test_one_weight_byte_changes_only_weights_digest(bases, single_fp, tmp_path):
    out = _copy(bases["single"], tmp_path / "flipped")
    path = out / "model.safetensors"
    header = read_header(path)
    info = header.tensors["model.layers.1.mlp.down_proj.weight"]
    data = bytearray(path.read_bytes())
    data[header.data_offset + info.start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    fp = fingerprint_model(out)
    assert fp.struct_digest == single_fp.struct_digest
    assert fp.weights_digest != single_fp.weights_digest


def test_other_weights_same_structure(bases, single_fp):
    fp = fingerprint_model(bases["other_seed"])
    assert fp.struct_digest == single_fp.struct_digest
    assert fp.weights_digest != single_fp.weights_digest


def test_shape_change_changes_struct_digest(bases, single_fp):
    fp = fingerprint_model(bases["wider"])
    assert fp.struct_digest != single_fp.struct_digest
    assert fp.weights_digest != single_fp.weights_digest


def test_dtype_is_in_weights_digest_only(bases, single_fp, tmp_path):
    out = _copy(bases["single"], tmp_path / "bf16")
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(out / "model.safetensors"))
    fp = fingerprint_model(out)
    assert fp.struct_digest == single_fp.struct_digest
    assert fp.weights_digest != single_fp.weights_digest


def test_config_architecture_fields_enter_struct_digest(bases, single_fp, tmp_path):
    out = _copy(bases["single"], tmp_path / "cfg")
    config = json.loads((out / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # not an architecture field
    (out / "config.json").write_text(json.dumps(config))
    assert fingerprint_model(out, weights=False).struct_digest == single_fp.struct_digest
    config["architectures"] = ["MistralForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    assert fingerprint_model(out, weights=False).struct_digest != single_fp.struct_digest
    (out / "config.json").unlink()
    assert fingerprint_model(out, weights=False).struct_digest != single_fp.struct_digest
    (out / "config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="config.json"):
        fingerprint_model(out)


def test_progress_counts_all_tensor_bytes(bases):
    seen: list[int] = []
    fingerprint_model(bases["sharded"], progress=seen.append)
    assert sum(seen) == model_weights(bases["sharded"]).total_bytes
    assert sum(seen) == sum(p.stat().st_size for p in bases["single"].glob("model.safetensors")) - read_header(
        bases["single"] / "model.safetensors"
    ).data_offset


def test_shapes_match_the_model(bases):
    model = tiny_llama(INGEST_LLAMA)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model_weight_shapes(bases["single"]) == expected


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(NotFoundError) as info:
        fingerprint_model(tmp_path / "nope")
    assert info.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no model.safetensors") as info:
        fingerprint_model(tmp_path / "empty")
    assert info.value.fix
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BadInputError) as info:
        fingerprint_model(tmp_path / "pt")
    assert "safe_serialization" in info.value.fix
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="not a directory"):
        fingerprint_model(tmp_path / "file")


def _edit_index(out, edit):
    path = out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def test_inconsistent_index_is_refused(bases, tmp_path):
    src = bases["sharded"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for name, shard in sorted(index["weight_map"].items()):
        by_shard.setdefault(shard, []).append(name)
    # a shard holding several tensors, so that unmapping one leaves the shard listed
    first_shard = next(s for s, names in sorted(by_shard.items()) if len(names) > 1)
    first_name = by_shard[first_shard][0]
    other_shard = next(s for s in sorted(set(index["weight_map"].values())) if s != first_shard)

    out = _copy(src, tmp_path / "missing_shard")
    (out / first_shard).unlink()
    with pytest.raises(NotFoundError, match="missing"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "traversal")
    _edit_index(out, lambda ix: ix["weight_map"].__setitem__(first_name, "../" + first_shard))
    with pytest.raises(BadInputError, match="invalid shard name"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "unlisted")
    _edit_index(out, lambda ix: ix["weight_map"].pop(first_name))
    with pytest.raises(BadInputError, match="not mapped"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "wrong_shard")
    _edit_index(out, lambda ix: ix["weight_map"].__setitem__(first_name, other_shard))
    with pytest.raises(BadInputError, match="not in its shard|not mapped to this shard"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "extra_name")
    _edit_index(out, lambda ix: ix["weight_map"].__setitem__("ghost.weight", first_shard))
    with pytest.raises(BadInputError, match="ghost.weight"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "no_map")
    _edit_index(out, lambda ix: ix.pop("weight_map"))
    with pytest.raises(BadInputError, match="weight_map"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "bad_json")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"a": "b", "a": "c"}}')
    with pytest.raises(BadInputError, match="duplicate"):
        fingerprint_model(out)

    out = _copy(src, tmp_path / "corrupt_shard")
    (out / other_shard).write_bytes((out / other_shard).read_bytes()[:-1])
    with pytest.raises(BadInputError, match=other_shard):
        fingerprint_model(out)


def test_hf_cache_style_symlinked_shards_are_followed(bases, single_fp, tmp_path):
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for path in bases["single"].iterdir():
        target = blobs / hashlib.sha256(path.name.encode()).hexdigest()
        shutil.copy(path, target)
        (snap / path.name).symlink_to(target)
    assert fingerprint_model(snap) == single_fp
