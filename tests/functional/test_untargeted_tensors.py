"""LoRA tensors PEFT would not load are refused by merge and unload (a consumers QA pass).

PEFT loads only the modules its config selects; the gate scores that. An adapter file
carrying LoRA tensors for another module (not in ``target_modules``, excluded, outside
``layers_to_transform``, or keys without ``base_model.model.``) was gated as if they were
not there and then unloaded with them: the gate passed retention 1.0, the shipped model
scored 0.0. The reference here is PEFT itself: what it loads must be what unload applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.adapter import load_adapter
from merging.model.unload import unload
from registry.errors import UnsupportedAdapterError
from tests.support.unload import load_model, logits, make_adapter, make_base, peft_model

pytestmark = pytest.mark.filterwarnings("ignore")
P = "base_model.model."
EXTRA = "model.layers.0.mlp.gate_proj"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("targets")
    base = make_base(root / "base", hidden=32, layers=2)
    return {"root": root, "base": base,
            "adapter": make_adapter(base, root / "adapter", targets=("q_proj", "v_proj"))}


def _edited(src: Path, dst: Path, *, config: dict | None = None, add_extra: bool = False,
            unprefix: bool = False) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(src / "adapter_model.safetensors")
    if add_extra:
        torch.manual_seed(0)
        tensors[f"{P}{EXTRA}.lora_A.weight"] = torch.randn(4, 32) * 0.5
        tensors[f"{P}{EXTRA}.lora_B.weight"] = torch.randn(64, 4) * 0.5
    if unprefix:
        tensors = {k.removeprefix(P): v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize(("case", "edit", "fragment"), [
    ("untargeted", {"add_extra": True}, "mlp.gate_proj'"),
    ("excluded", {"config": {"exclude_modules": ["v_proj"]}}, "v_proj'"),
    ("layers", {"config": {"layers_to_transform": [1], "layers_pattern": "layers"}},
     "layers.0.self_attn"),
    ("unprefixed", {"unprefix": True}, "lack PEFT's 'base_model.model.' prefix"),
])
def test_tensors_peft_would_ignore_are_refused(world, tmp_path, case, edit, fragment):
    adapter = _edited(world["adapter"], tmp_path / case, **edit)
    with pytest.raises(UnsupportedAdapterError, match="PEFT") as info:
        load_adapter(adapter)
    assert fragment in info.value.message
    with pytest.raises(UnsupportedAdapterError):
        unload(str(adapter), str(world["base"]), str(tmp_path / "out"), sync=False)
    assert not (tmp_path / "out").exists()


def test_a_regex_target_that_selects_every_module_unloads_as_peft_applies_it(world, tmp_path):
    adapter = _edited(world["adapter"], tmp_path / "regex",
                      config={"target_modules": r".*\.(q_proj|v_proj)"})
    unload(str(adapter), str(world["base"]), str(tmp_path / "out"), sync=False)
    got, reference = logits(load_model(tmp_path / "out")), logits(peft_model(world["base"], adapter))
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)


def test_fan_in_fan_out_on_linear_modules_is_applied_as_peft_applies_it(world, tmp_path):
    # PEFT resets fan_in_fan_out on nn.Linear (a warning) and the gate follows PEFT; unload
    # added the transposed delta on square modules and refused non-square ones
    adapter = _edited(world["adapter"], tmp_path / "fifo", config={"fan_in_fan_out": True})
    result = unload(str(adapter), str(world["base"]), str(tmp_path / "out"), sync=False)
    assert any("fan_in_fan_out ignored" in note for note in result.notes)
    got, reference = logits(load_model(tmp_path / "out")), logits(peft_model(world["base"], adapter))
    assert torch.allclose(got, reference, atol=1e-5, rtol=0), float((got - reference).abs().max())


def test_an_all_linear_adapter_is_gated_as_peft_loads_it(world, tmp_path):
    # the keyword was read as a regex matching nothing: every gate check errored
    from gate.evaluate import Evaluator
    from tests.support.unload import LINEAR_TARGETS, PROBE

    full = make_adapter(world["base"], tmp_path / "full", targets=LINEAR_TARGETS)
    adapter = _edited(full, tmp_path / "all-linear", config={"target_modules": "all-linear"})
    with torch.no_grad():
        gated = Evaluator(world["base"]).with_adapter("c", adapter)(PROBE).logits.float()
    reference = logits(peft_model(world["base"], adapter))
    assert torch.allclose(gated, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, logits(load_model(world["base"])))


def test_all_linear_adapters_unload_as_peft_loads_them_whatever_the_case(world, tmp_path):
    # PEFT lowercases the keyword; "ALL-LINEAR" was read as a regex matching nothing
    from tests.support.unload import LINEAR_TARGETS

    full = make_adapter(world["base"], tmp_path / "full", targets=LINEAR_TARGETS)
    for keyword in ("all-linear", "ALL-Linear"):
        adapter = _edited(full, tmp_path / keyword, config={"target_modules": keyword})
        out = tmp_path / f"out-{keyword}"
        unload(str(adapter), str(world["base"]), str(out), sync=False)
        got, reference = logits(load_model(out)), logits(peft_model(world["base"], adapter))
        assert torch.allclose(got, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("extra", "config", "fragment", "where"), [
    # PEFT's all-linear leaves the output layer out: the gate ignores these tensors
    (("lm_head",), {}, "output layer 'lm_head'", "unload"),
    # ... and takes Linear/Conv1D layers only, not embeddings
    (("embed_tokens",), {}, "the embedding 'model.embed_tokens'", "load"),
    # the other rules still apply
    ((), {"exclude_modules": ["v_proj"]}, "v_proj", "load"),
])
def test_all_linear_tensors_peft_would_ignore_are_refused(world, tmp_path, extra, config,
                                                         fragment, where):
    from tests.support.unload import LINEAR_TARGETS

    full = make_adapter(world["base"], tmp_path / "full", targets=LINEAR_TARGETS + extra)
    adapter = _edited(full, tmp_path / "all-linear", config={"target_modules": "all-linear", **config})
    if where == "load":
        with pytest.raises(UnsupportedAdapterError, match="PEFT, and so the gate, would ignore") as info:
            load_adapter(adapter)
        assert fragment in info.value.message
    else:
        load_adapter(adapter)  # no base known: the output layer cannot be named yet
    with pytest.raises(UnsupportedAdapterError) as info:
        unload(str(adapter), str(world["base"]), str(tmp_path / "out"), sync=False)
    assert fragment in info.value.message
    assert not (tmp_path / "out").exists()
    if where == "unload":  # the reference: PEFT loads the file and leaves lm_head alone
        wrapped = peft_model(world["base"], adapter)
        assert not any("lm_head.lora_A" in name for name, _ in wrapped.named_parameters())


def test_merge_search_names_the_output_layer_of_the_loaded_base(world, tmp_path):
    # what gate/search/run.py checks on the base it loaded, before the live swap
    from merging.targeting import check_output_layer
    from registry.formats.architecture import output_layer, output_layer_name
    from tests.support.unload import LINEAR_TARGETS

    model = load_model(world["base"])
    config = json.loads((world["base"] / "config.json").read_text())
    assert output_layer(model) == output_layer_name(config) == "lm_head"
    full = make_adapter(world["base"], tmp_path / "full", targets=LINEAR_TARGETS + ("lm_head",))
    adapter = load_adapter(_edited(full, tmp_path / "al", config={"target_modules": "all-linear"}))
    with pytest.raises(UnsupportedAdapterError, match="output layer 'lm_head'"):
        check_output_layer(adapter.path, adapter.config, adapter.infos, output_layer(model))
    listed = load_adapter(full)  # the same tensors with lm_head listed: PEFT loads them
    check_output_layer(listed.path, listed.config, listed.infos, output_layer(model))


@pytest.mark.parametrize("init", [False, True])
def test_random_initialised_modules_missing_from_the_file_are_not_gated(world, tmp_path, init):
    # init_lora_weights false: PEFT draws B at random too, so a targeted module without
    # tensors in the file adds a random delta the gate would score and unload never applies
    from gate.evaluate import Evaluator
    from tests.support.unload import PROBE

    adapter = _edited(world["adapter"], tmp_path / "edited", config={"init_lora_weights": init})
    tensors = load_file(adapter / "adapter_model.safetensors")
    dropped = f"{P}model.layers.1.self_attn.v_proj"
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped + ".")},
              adapter / "adapter_model.safetensors")
    evaluator = Evaluator(world["base"])
    if init is False:
        with pytest.raises(UnsupportedAdapterError, match="layers.1.self_attn.v_proj'") as info:
            evaluator.with_adapter("c", adapter)
        assert "init_lora_weights is false" in info.value.message
    else:  # B starts at zero: the missing module adds nothing, as unload does
        out = tmp_path / "out"
        unload(str(adapter), str(world["base"]), str(out), sync=False)
        with torch.no_grad():
            gated = evaluator.with_adapter("c", adapter)(PROBE).logits.float()
        assert torch.allclose(gated, logits(load_model(out)), atol=1e-4, rtol=0)
