"""Adapter/model records: building, normalisation and hand-written schema checks."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from registry.errors import BadInputError
from registry.record import TensorSummary, build_model_record, build_record, validate_record

CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"],
          "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "task_type": "CAUSAL_LM",
          "lora_dropout": 0.05, "inference_mode": True}
TENSORS = TensorSummary(count=4, dtypes={"F32": 4}, parameters=1024)
FP = {"struct_digest": "sha256:" + "1" * 64, "weights_digest": "sha256:" + "2" * 64}


def record(**kwargs: Any) -> dict:
    return build_record(CONFIG, TENSORS, fingerprint=FP, author="alice",
                        created="2025-01-31T12:00:00Z", **kwargs)


def test_build_record_fills_defaults_and_keeps_only_record_fields() -> None:
    rec = record(metrics={"eval_loss": 1.5}, labels={"team": "nlp"}, dataset="alpaca-v2",
                 hyperparameters={"lr": 2e-4, "schedule": "cosine"}, license="apache-2.0",
                 known_risks=["may hallucinate"], base_revision="abc123")
    assert rec["kind"] == "adapter"
    assert rec["peft"] == {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                           "target_modules": ["q_proj", "v_proj"], "rank_pattern": {},
                           "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
                           "modules_to_save": None, "bias": "none", "task_type": "CAUSAL_LM"}
    assert rec["tensors"] == {"count": 4, "dtypes": {"F32": 4}, "parameters": 1024}
    assert rec["base_model"] == {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "abc123",
                                 "fingerprint": FP}
    assert rec["dataset"] == {"version": "alpaca-v2", "digest": None}
    assert rec["created"] == "2025-01-31T12:00:00Z" and rec["author"] == "alice"
    assert validate_record(rec) == rec  # normalised form is a fixed point


def test_defaults_author_and_created(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS_ACTOR", "ci-bot")
    rec = build_record(CONFIG, TENSORS)
    assert rec["author"] == "ci-bot"
    assert rec["created"].endswith("Z")
    assert rec["base_model"]["fingerprint"] is None


def test_fingerprint_object_and_dataset_digest() -> None:
    class FakeFingerprint:
        struct_digest = FP["struct_digest"]
        weights_digest = None

    rec = build_record(CONFIG, TENSORS, fingerprint=FakeFingerprint(), dataset="sha256:" + "d" * 64,
                       author="a")
    assert rec["base_model"]["fingerprint"] == {"struct_digest": FP["struct_digest"],
                                                "weights_digest": None}
    assert rec["dataset"] == {"version": None, "digest": "sha256:" + "d" * 64}


def test_tensor_summary_round_trip() -> None:
    assert TensorSummary.from_json(TENSORS.to_json()) == TENSORS
    with pytest.raises(BadInputError, match="tensors.count"):
        TensorSummary.from_json({"count": -1, "dtypes": {}, "parameters": 0})


def _mutate(path: str, value: Any) -> dict:
    rec = copy.deepcopy(record())
    node = rec
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    if value is KeyError:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return rec


@pytest.mark.parametrize("path,value,needle", [
    ("peft.r", 0, "peft.r"),
    ("peft.r", True, "peft.r"),
    ("peft.r", KeyError, "peft.r"),
    ("peft.peft_type", "", "peft.peft_type"),
    ("peft.lora_alpha", "16", "peft.lora_alpha"),
    ("peft.lora_alpha", math.nan, "peft.lora_alpha"),
    ("peft.target_modules", [1], "peft.target_modules[0]"),
    ("peft.rank_pattern", {"q_proj": 0}, "peft.rank_pattern.q_proj"),
    ("peft.alpha_pattern", {"q_proj": "x"}, "peft.alpha_pattern.q_proj"),
    ("peft.use_rslora", 1, "peft.use_rslora"),
    ("peft.use_dora", "no", "peft.use_dora"),
    ("peft.modules_to_save", "lm_head", "peft.modules_to_save"),
    ("peft.bias", "some", "peft.bias"),
    ("peft.lora_dropout", 0.1, "peft.lora_dropout"),
    ("tensors.count", -1, "tensors.count"),
    ("tensors.dtypes", {"F32": "4"}, "tensors.dtypes.F32"),
    ("base_model.fingerprint", {"struct_digest": "md5:x"}, "base_model.fingerprint.struct_digest"),
    ("base_model.id", 5, "base_model.id"),
    ("dataset", "alpaca", "dataset"),
    ("hyperparameters", {"lr": math.inf}, "hyperparameters.lr"),
    ("metrics", {"loss": "low"}, "metrics.loss"),
    ("metrics", {"ok": True}, "metrics.ok"),
    ("metrics", {"": 1.0}, "metrics"),
    ("known_risks", "one", "known_risks"),
    ("known_risks", ["ok", ""], "known_risks[1]"),
    ("license", "", "license"),
    ("created", "yesterday", "created"),
    ("created", "2025-01-31T12:00:00+02:00", "created"),
    ("created", "2025-02-30T12:00:00Z", "created"),
    ("author", None, "author"),
    ("labels", {"team": 3}, "labels.team"),
    ("kind", "dataset", "kind"),
    ("surprise", 1, "surprise"),
])
def test_validate_record_names_the_bad_field(path: str, value: Any, needle: str) -> None:
    with pytest.raises(BadInputError) as err:
        validate_record(_mutate(path, value))
    assert f"record.{needle}" in err.value.message
    assert err.value.fix


def test_target_modules_may_be_a_regex_string() -> None:
    rec = _mutate("peft.target_modules", r".*\.(q|v)_proj")
    assert validate_record(rec)["peft"]["target_modules"] == r".*\.(q|v)_proj"


def test_model_record() -> None:
    rec = build_model_record(FP, location="/tmp/m", quantization={"bits": 4}, base_model="b",
                             author="a", created="2025-01-01T00:00:00.5Z",
                             tensors=TENSORS, metrics={"ppl": 7.0})
    assert rec["kind"] == "model" and rec["weights"] == FP and rec["quantization"] == {"bits": 4}
    assert validate_record(rec) == rec
    with pytest.raises(BadInputError, match="record.weights.weights_digest"):
        build_model_record({"struct_digest": FP["struct_digest"], "weights_digest": None},
                           author="a")
    with pytest.raises(BadInputError, match="record.peft"):
        validate_record({**rec, "peft": {}})


def test_huge_integer_metric_is_a_clear_error() -> None:
    """An int beyond float range is bad input, not an OverflowError crash."""
    with pytest.raises(BadInputError, match=r"record\.metrics\.x must be a finite number"):
        record(metrics={"x": 10**400})


def test_layer_restrictions_recorded_only_when_set() -> None:
    restricted = {**CONFIG, "layers_to_transform": [29, 18, 20], "layers_pattern": "layers",
                  "exclude_modules": ["b", "a"]}
    rec = build_record(restricted, TENSORS, fingerprint=FP, author="a", created="2025-01-31T12:00:00Z")
    assert rec["peft"]["layers_to_transform"] == [18, 20, 29]
    assert rec["peft"]["layers_pattern"] == "layers"
    assert rec["peft"]["exclude_modules"] == ["a", "b"]
    assert validate_record(rec) == rec
    single = build_record({**CONFIG, "layers_to_transform": 3}, TENSORS, author="a")
    assert single["peft"]["layers_to_transform"] == [3]
    # unset (or null, as PEFT writes it): not in the record, so digests do not change
    plain = build_record({**CONFIG, "layers_to_transform": None, "layers_pattern": None},
                         TENSORS, author="a")
    assert not {"layers_to_transform", "layers_pattern", "exclude_modules"} & set(plain["peft"])


@pytest.mark.parametrize("field,value,needle", [
    ("layers_to_transform", [1, -2], "peft.layers_to_transform[1]"),
    ("layers_to_transform", "0-3", "peft.layers_to_transform"),
    ("layers_to_transform", [True], "peft.layers_to_transform[0]"),
    ("layers_pattern", 5, "peft.layers_pattern"),
    ("exclude_modules", [""], "peft.exclude_modules[0]"),
])
def test_bad_layer_restrictions_name_the_field(field: str, value: Any, needle: str) -> None:
    with pytest.raises(BadInputError) as err:
        build_record({**CONFIG, field: value}, TENSORS, author="a")
    assert f"record.{needle}" in err.value.message


def test_lora_bias_is_recorded_only_when_true() -> None:
    # found by a QA pass: push stored a lora_bias adapter and dropped the flag from its record
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    tensors = TensorSummary(2, {"F32": 2}, 10)
    plain = build_record(config, tensors, created="2026-01-01T00:00:00Z")
    assert "lora_bias" not in plain["peft"]  # older records (and their digests) unchanged
    assert build_record({**config, "lora_bias": False}, tensors,
                        created="2026-01-01T00:00:00Z") == plain
    flagged = build_record({**config, "lora_bias": True}, tensors, created="2026-01-01T00:00:00Z")
    assert flagged["peft"]["lora_bias"] is True and validate_record(flagged) == flagged
    with pytest.raises(BadInputError, match="peft.lora_bias"):
        validate_record({**flagged, "peft": {**flagged["peft"], "lora_bias": "yes"}})
