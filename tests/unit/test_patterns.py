"""Config patterns are matched in linear time and exactly as PEFT matches them.

The hostile cases of issue 11 item 7 (``(a|aa)+`` against 44 ``a`` then ``b`` ran over
90 s with Python's ``re``) must finish in well under a second for any pattern and a
10 kB name; the ordinary cases are compared with PEFT's own functions
(``get_pattern_key``, ``match_target_against_key``, ``check_target_module_exists``),
the independent reference.
"""

from __future__ import annotations

import time

import pytest

from registry.errors import BadInputError
from registry.formats.patterns import (
    check_config_patterns,
    fullmatch,
    layer_index,
    module_targeted,
    pattern_key,
)
from registry.formats.peft_keys import alpha_for, rank_for

HOSTILE = ["(a|aa)+", "(a+)+$", "(a+)+b", "(.*a){20}", "(.*.*)*x", "(a|a?)+$", "(\\w+\\w+)+c",
           "([a-z]+)*$", "(a*)*b", ".*.*.*.*.*.*.*.*x"]
NAMES = ["a" * 44 + "b", "a" * 10_000 + "b", "a" * 10_240, "a." * 5_000 + "!"]

ORDINARY = [
    "q_proj", "v_proj", r"layers\.1\.self_attn\.q_proj", "mlp.*", r".*\.(q|v)_proj",
    r"model\.layers\.\d+\.mlp\.(up|down)_proj", r"[^.]+_proj", "self_attn", r"\w+\.\d{1,2}\..*",
    r"(?:layers\.0|layers\.1)\..*k_proj", r"(?i:Q_PROJ)", "proj", r"up_proj|gate_proj", "a{,3}",
    "[[:alpha:]]+", r"\bq_proj", r"(?s:.)*proj\Z", r"[\D]+", r"[^\W\d]+", r"\u0071_proj",
    "layers.1", r".*\.layers\.[02]\..*", "(q|k)_pro?j", "embed_tokens", "lm_head",
]
MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj", "model.layers.2.self_attn.v_proj",
    "model.layers.12.mlp.up_proj", "model.layers.0.mlp.gate_proj", "model.embed_tokens",
    "lm_head", "q_proj", "model.layers.0.self_attn.kk_proj", "model.layers.0.Q_PROJ",
    "encoder.block.3.layer.0.SelfAttention.q", "model.é.1.x", "aaa", "[[:a",
    "model.layers.1.experts.0.w1", "transformer.h.4.attn.c_attn",
]


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_finish_in_under_a_second(pattern):
    start = time.perf_counter()
    for name in NAMES:
        pattern_key([pattern], name)
        fullmatch(pattern, name)
        rank_for("base_model.model." + name, 4, {pattern: 2})
        alpha_for(name, 8.0, {pattern: 3.0})
        module_targeted({"target_modules": pattern, "exclude_modules": pattern,
                         "modules_to_save": [pattern]}, name)
        module_targeted({"target_modules": ["a"], "layers_to_transform": [1],
                         "layers_pattern": [pattern]}, name)
    assert time.perf_counter() - start < 1.0, pattern


def test_the_issue_case_is_fast_and_correct():
    start = time.perf_counter()
    assert rank_for("a" * 10_000 + "b", 8, {"(a|aa)+": 4}) == 8
    assert rank_for("x." + "a" * 10_000, 8, {"(a|aa)+": 4}) == 4
    assert time.perf_counter() - start < 1.0


def _peft_key(pattern: str, name: str):  # None, "error" or the key, as PEFT decides
    import re

    from peft.utils.other import get_pattern_key

    try:
        key = get_pattern_key([pattern], name)
    except re.error:
        return "error"
    return None if key == name and pattern != name else key


@pytest.mark.parametrize("pattern", ORDINARY)
def test_rank_pattern_keys_match_like_peft(pattern):
    for name in MODULES:
        expected = _peft_key(pattern, name)
        if expected == "error":
            with pytest.raises(BadInputError, match="rank_pattern"):
                pattern_key([pattern], name)
            continue
        assert pattern_key([pattern], name) == expected, (pattern, name)
        assert rank_for(name, 8, {pattern: 2, "zzz": 3}) == (2 if expected else 8)


def test_first_matching_key_wins_like_peft():
    from peft.utils.other import get_pattern_key

    keys = ["mlp.*", "q_proj", r".*\.(q|v)_proj", "proj", r"layers\.1\..*"]
    for name in MODULES:
        ours = pattern_key(keys, name)
        assert (ours or name) == get_pattern_key(keys, name), name


@pytest.mark.parametrize("pattern", ORDINARY)
def test_string_target_modules_match_like_peft(pattern):
    from peft.utils.other import match_target_against_key

    for name in MODULES:
        assert fullmatch(pattern, name) == bool(match_target_against_key(pattern, name)), (
            pattern, name)


CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["layers.1.self_attn.k_proj"]},
    {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["q_proj", "k_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "w1"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "w1"], "layers_to_transform": 1,
     "layers_pattern": ["h", "experts"]},
    {"target_modules": ["c_attn", "q_proj"], "modules_to_save": ["lm_head", "h.4"]},
    {"target_modules": "q_proj|lm_head", "modules_to_save": ["lm_head"]},
]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_module_targeting_matches_peft(index):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    raw = CONFIGS[index]
    config = LoraConfig(**raw)
    for name in MODULES:
        assert module_targeted(raw, name) == bool(check_target_module_exists(config, name)), (
            raw, name)


def test_layer_index_picks_the_first_index_like_peft():
    assert layer_index(None, "model.layers.3.experts.1.w1") == 3
    assert layer_index("experts", "model.layers.3.experts.1.w1") == 1
    assert layer_index(["nope", "layers"], "model.layers.3.experts.1.w1") == 3
    assert layer_index("layers", "lm_head") is None


@pytest.mark.parametrize(("field", "config"), [
    ("rank_pattern", {"rank_pattern": {"(?=q)proj": 2}}),
    ("alpha_pattern", {"alpha_pattern": {"(?<!k)_proj": 2}}),
    ("target_modules", {"target_modules": r"(q)_\1"}),
    ("exclude_modules", {"exclude_modules": "(?!lm_head).*"}),
    ("layers_pattern", {"layers_pattern": ["(?=layers)layers"]}),
    ("modules_to_save", {"modules_to_save": ["lm_(?=head)head"]}),
    ("target_modules", {"target_modules": "a*+"}),
    ("target_modules", {"target_modules": "(?>a)"}),
])
def test_patterns_re2_cannot_run_are_refused_naming_the_field(field, config):
    with pytest.raises(BadInputError) as info:
        check_config_patterns(config)
    message = info.value.message
    assert field in message and "linear time" in message and "\n" not in message
    assert info.value.fix


def test_refusal_message_truncates_the_pattern():
    pattern = "(?=x)" + "y" * 900
    with pytest.raises(BadInputError) as info:
        check_config_patterns({"target_modules": pattern})
    assert len(info.value.message) < 250 and "..." in info.value.message


@pytest.mark.parametrize("pattern", ["(", "x" * 70_000, "a{2,1}"])
def test_invalid_or_overlong_patterns_are_refused(pattern):
    with pytest.raises(BadInputError, match="target_modules"):
        check_config_patterns({"target_modules": pattern})


def test_names_with_control_characters_are_refused():
    with pytest.raises(BadInputError, match="control characters"):
        fullmatch("a", "a\n")


def test_a_merge_output_target_regex_is_accepted_and_matches_like_peft():
    # merging/lora/peft_output.py writes an alternation of every merged module name
    import re

    names = [f"model.layers.{i}.{part}.{m}_proj" for i in range(80)
             for part, ms in (("self_attn", "qkvo"), ("mlp", ("up", "down", "gate"))) for m in ms]
    regex = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    assert len(regex) > 15_000
    check_config_patterns({"target_modules": regex})
    for name in [*names[::37], "model.layers.80.mlp.up_proj", "model.layers.1.self_attn.x_proj"]:
        assert fullmatch(regex, name) == bool(re.fullmatch(regex, name)), name


def test_a_record_with_a_lookaround_pattern_is_refused():
    from registry.record import validate_record

    record = {"kind": "adapter", "author": "t", "created": "2025-01-31T12:00:00Z",
              "tensors": {"count": 2, "dtypes": {"F32": 2}, "parameters": 8},
              "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"],
                       "rank_pattern": {"(?=q)q": 2}}}
    with pytest.raises(BadInputError, match=r"record field peft\.rank_pattern"):
        validate_record(record)
