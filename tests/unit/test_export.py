"""export: plain PEFT directory + model card, atomic, refuses non-empty targets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from registry.errors import BadInputError, ConflictError, IntegrityError
from registry.export import export, model_card
from registry.lineage import make_lineage, parent
from registry.record import build_model_record
from tests.support.registry import (FAKE_BASE, adapter_files, make_adapter_dir, new_store,
                                     push_adapter, sample_record)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_writes_files_and_card(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    adir = make_adapter_dir(tmp_path / "a")
    version = push_adapter(store, "lora-a", adir, known_risks=["toxic | pipes"]).version
    result = export(store, "lora-a", tmp_path / "out")
    out = tmp_path / "out"
    assert result.path == out and result.files == ["README.md", "adapter_config.json",
                                                    "adapter_model.safetensors"]
    for name, src in adapter_files(adir).items():
        assert (out / name).read_bytes() == src.read_bytes()
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert "eval_loss" in card and "toxic | pipes" in card and version.digest in card
    assert FAKE_BASE["weights_digest"] in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.export-")]


def test_export_into_empty_existing_dir_and_refusals(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    export(store, "lora-a", tmp_path / "empty")
    assert (tmp_path / "empty" / "adapter_config.json").is_file()
    with pytest.raises(ConflictError):
        export(store, "lora-a", tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConflictError):
        export(store, "lora-a", tmp_path / "file")


def test_export_of_corrupt_version_leaves_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    version = push_adapter(store, "lora-a", make_adapter_dir(tmp_path / "a")).version
    path = store.blobs.path(version.files[1]["digest"])
    os.chmod(path, 0o644)
    path.write_bytes(b"garbage")
    with pytest.raises(IntegrityError):
        export(store, "lora-a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_card_lists_lineage_and_handles_missing_fields(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    a = push_adapter(store, "a", make_adapter_dir(tmp_path / "a")).version
    mdir = make_adapter_dir(tmp_path / "m", r=2)
    record = sample_record(mdir, base_model=None, license=None, metrics={}, known_risks=[])
    record["base_model"]["id"] = None
    merged = store.push("m", adapter_files(mdir), record,
                        lineage=make_lineage([parent(a, weight=0.5)], method="ties")).version
    card = model_card(merged)
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    assert meta["base_model_relation"] == "adapter"
    assert f"{a.ref} (input, weight 0.5)" in card and "ties" in card
    assert "None recorded." in card


def test_export_refuses_model_recorded_by_reference(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    a = push_adapter(store, "a", make_adapter_dir(tmp_path / "a")).version
    record = build_model_record(FAKE_BASE, author="t")
    store.record_derived("m", record, make_lineage([parent(a)], method="merge_and_unload"))
    with pytest.raises(BadInputError):
        export(store, "m", tmp_path / "out")
