"""A gate policy is untrusted input (issue 11 items 8 and 9), tested without models.

* YAML: a "billion laughs" bomb, deep nesting, oversized files and values whose
  ``repr`` would be huge are refused in bounded time with a short one-line message;
* data paths: files that resolve outside the policy's directory are refused unless
  ``allow_outside_data=True``; an ordinary policy's digest does not change.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import yaml

from gate.policy import MAX_POLICY_BYTES, load_policy
from registry.errors import BadInputError


def billion_laughs() -> str:
    """The issue's bomb: 9 levels of 9 aliases (9^9 "lol"s) under ``version:``, < 500 bytes."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "version:\n" + "".join(f"  {line}\n" for line in lines) + "checks: []\n"


def _load(tmp_path: Path, text: str, **kwargs: object):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return load_policy(path, **kwargs)


def _refused(tmp_path: Path, text: str, fragment: str, limit: float = 1.0) -> BadInputError:
    start = time.perf_counter()
    with pytest.raises(BadInputError, match=fragment) as info:
        _load(tmp_path, text)
    assert time.perf_counter() - start < limit
    # bounded apart from the policy's path, whose length depends on the tmp dir (xdist: longer)
    assert "\n" not in info.value.message
    assert len(info.value.message.replace(str(tmp_path), "")) < 400
    assert info.value.exit_code == 2 and info.value.fix
    return info.value


def test_billion_laughs_is_refused_in_under_a_second(tmp_path):
    bomb = billion_laughs()
    assert len(bomb.encode()) < 500
    err = _refused(tmp_path, bomb, "more than 100000 nodes")
    assert "aliases" in err.message


@pytest.mark.parametrize("text", ["version: &a [*a]\n", "version: &a {x: [1, *a]}\n"])
def test_recursive_aliases_are_refused(tmp_path, text):
    _refused(tmp_path, text, "recursive YAML alias")


def test_aliases_deepening_the_tree_are_refused(tmp_path):
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 40)]
    _refused(tmp_path, "version:\n" + "".join(f"  {line}\n" for line in lines), "deeper than")


def test_ordinary_anchors_and_aliases_still_load(tmp_path):
    prompts = ["Say hi.", "Count to 3."]  # one list used twice: safe_dump writes &id001/*id001
    doc = yaml.safe_dump({"version": 1, "seed": 3, "checks": [
        {"kind": "generation", "prompts": prompts},
        {"kind": "merge_equivalence", "prompts": prompts}]})
    assert "*id001" in doc
    policy = _load(tmp_path, doc)
    assert policy.checks[1]["prompts"] == prompts and policy.seed == 3


@pytest.mark.parametrize("text", ["version: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "version:\n" + "".join("  " * i + "- \n" for i in range(200))])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, text):
    _refused(tmp_path, text, "deeper than")


def test_oversized_policy_is_refused_before_parsing(tmp_path):
    _refused(tmp_path, "version: 1\n# " + "x" * MAX_POLICY_BYTES + "\n", "larger than")


@pytest.mark.parametrize("text", [
    "version: [" + ", ".join(["lol"] * 60_000) + "]\n",      # huge list in a message
    "version: " + "'" + "z" * 500_000 + "'\n",               # huge string
    "version: 1\n? " + "y" * 300_000 + "\n: 1\n",              # huge unknown key
    "version: 1\nchecks:\n  - kind: [" + "a, " * 50_000 + "b]\n",  # unhashable kind
])
def test_messages_show_bounded_values(tmp_path, text):
    # documents of a few hundred kB: PyYAML's pure-Python parser takes a second or two
    _refused(tmp_path, text, "policy field", limit=15.0)


@pytest.mark.parametrize("text", [
    "version: 1\n1: a\nb: 2\n",                 # keys of mixed types (unsortable)
    "version: 1\nchecks:\n  - kind: generation\n    prompts: [a]\n    7: x\n    z: y\n",
])
def test_keys_of_mixed_types_are_a_bad_input_error(tmp_path, text):
    _refused(tmp_path, text, "not a known")


@pytest.mark.parametrize("text", ["version: 1\nseed: " + "1" * 5000 + "\n",
                                  "version: 2020-13-45\n", "version: !!python/object:os.system x\n"])
def test_values_the_loader_cannot_build_are_a_bad_input_error(tmp_path, text):
    _refused(tmp_path, text, "not valid YAML")


# --- data paths --------------------------------------------------------------------------

def _policy_dir(tmp_path: Path) -> Path:
    inside = tmp_path / "repo" / "policies"
    (inside / "data").mkdir(parents=True)
    (inside / "data" / "ok.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "secret.txt").write_text("TOKEN=hunter2\n")
    return inside


def _ppl(data: str) -> str:
    return yaml.safe_dump({"version": 1, "checks": [
        {"kind": "perplexity", "data": data, "max_increase": 0.1}]})


def _ret(data: str) -> str:
    return yaml.safe_dump({"version": 1, "checks": [
        {"kind": "retention", "sets": {"parent": data}, "min_ratio": 0.9}]})


ESCAPES = ["../../secret.txt", "{root}/secret.txt", "/etc/passwd", "/proc/self/environ",
           "data/../../../secret.txt", "data/link-out", "~/.bashrc"]


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize(("doc", "field"), [(_ppl, "checks[0].data"),
                                            (_ret, "checks[0].sets.parent")])
def test_data_paths_leaving_the_policy_directory_are_refused(tmp_path, escape, doc, field):
    inside = _policy_dir(tmp_path)
    os.symlink(tmp_path / "secret.txt", inside / "data" / "link-out")
    path = inside / "gate.yaml"
    path.write_text(doc(escape.format(root=tmp_path)))
    with pytest.raises(BadInputError) as info:
        load_policy(path)
    assert field in info.value.message and "outside the policy's directory" in info.value.message
    assert "--allow-outside-data" in info.value.fix


def test_outside_data_is_read_with_allow_outside_data(tmp_path):
    inside = _policy_dir(tmp_path)
    os.symlink(tmp_path / "secret.txt", inside / "data" / "link-out")
    for written in ("../../secret.txt", str(tmp_path / "secret.txt"), "data/link-out"):
        (inside / "gate.yaml").write_text(_ppl(written))
        policy = load_policy(inside / "gate.yaml", allow_outside_data=True)
        assert policy.checks[0].data_file("data").path == (tmp_path / "secret.txt").resolve()
        assert list(policy.data_digests) == [written]


def test_paths_inside_the_directory_keep_working(tmp_path):
    inside = _policy_dir(tmp_path)
    os.symlink("ok.jsonl", inside / "data" / "link-in")  # a symlink that stays inside
    for written in ("data/ok.jsonl", "./data/../data/ok.jsonl", "data/link-in",
                    str(inside / "data" / "ok.jsonl")):
        (inside / "gate.yaml").write_text(_ppl(written))
        assert load_policy(inside / "gate.yaml").checks[0].data_file("data").path.name == "ok.jsonl"


def test_ordinary_policy_digest_is_unchanged(tmp_path):
    # the digest test_gate_policy.py's GOOD policy had before these checks existed
    data = tmp_path / "data"
    data.mkdir()
    (data / "heldout.jsonl").write_text('{"text": "a b c"}\n')
    (data / "a.jsonl").write_text('{"prompt": "A cat =", "answer": "meow"}\n')
    doc = {"version": 1, "checks": [
        {"kind": "structural", "max_rank": 64},
        {"kind": "merge_equivalence", "prompts": ["hello there"]},
        {"kind": "perplexity", "data": "data/heldout.jsonl", "max_increase": 0.05},
        {"kind": "retention", "sets": {"adapter-a": "data/a.jsonl"}, "min_ratio": 0.9},
        {"kind": "generation", "prompts": ["Say hi."]},
    ]}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    expected = "sha256:fc43528dd1ddec75dbf46e42fa2cf1c269f83199dd58fbe8041171d815c25233"
    assert load_policy(tmp_path / "gate.yaml").digest == expected
    assert load_policy(tmp_path / "gate.yaml", allow_outside_data=True).digest == expected


@pytest.mark.parametrize(("field", "name", "content", "words"), [
    ("data", "heldout.jsonl", '{"text": "ok"}\n{not json\n', "heldout.jsonl:2: not valid JSON"),
    ("data", "heldout.jsonl", '{"other": "x"}\n', "needs string field(s) text"),
    ("data", "heldout.txt", "\n\n", "holds no text"),
    ("data", "heldout.txt", b"\xff\xfe not utf-8", "cannot read"),
    ("sets", "a.jsonl", '{"prompt": "1+1", "answer": 2}\n', "needs string field(s) prompt, answer"),
])
def test_malformed_eval_data_is_bad_input_at_load(tmp_path, field, name, content, words):
    # found by a QA pass: a malformed data file made its check "error" (gate exit 1) instead
    # of exit 2; the policy loader now parses each file as its check will
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    check = (f"  - kind: perplexity\n    data: {name}\n    max: 100\n" if field == "data" else
             f"  - kind: retention\n    sets:\n      a: {name}\n    min_score: 0.5\n")
    (tmp_path / "gate.yaml").write_text("version: 1\nchecks:\n" + check)
    with pytest.raises(BadInputError) as err:
        load_policy(tmp_path / "gate.yaml")
    assert words in err.value.message and f"checks[0].{field}" in err.value.message


# --- found by the gate QA pass of stop 21 ---

def test_a_key_given_twice_is_refused_not_the_last_one_kept(tmp_path):
    (tmp_path / "h.txt").write_text("some text\n")
    text = ("version: 1\nchecks:\n  - kind: perplexity\n    data: h.txt\n    max: 2\n"
            "    baseline: base\n    max: 1000000000\n")
    err = _refused(tmp_path, text, "has the key 'max' twice")
    assert "line 7" in err.message


def test_yaml_merge_keys_still_override(tmp_path):
    (tmp_path / "h.txt").write_text("some text\n")
    text = ("x: &common {kind: perplexity, data: h.txt, max: 2}\nversion: 1\nchecks:\n"
            "  - <<: *common\n    max: 3\n")
    with pytest.raises(BadInputError, match="not a known top-level field|x"):
        _load(tmp_path, text)  # `x` is not a policy field, but the merge itself parsed
    text = "version: 1\nchecks:\n  - &c {kind: perplexity, data: h.txt, max: 2}\n  - <<: *c\n    name: p2\n    max: 3\n"
    policy = _load(tmp_path, text)
    assert [c["max"] for c in policy.checks] == [2, 3]


@pytest.mark.parametrize(("fragment", "where"), [
    ("seed: 18446744073709551616\n", "seed must be an integer in [0, 18446744073709551615]"),
    ("max_length: 100000000000\n", "max_length must be an integer in [8, 2147483647]"),
])
def test_top_level_integers_are_bounded(tmp_path, fragment, where):
    (tmp_path / "h.txt").write_text("some text\n")
    _refused(tmp_path, "version: 1\n" + fragment + "checks:\n  - {kind: perplexity, data: h.txt, max: 9}\n",
             re.escape(where))


@pytest.mark.parametrize(("check", "where"), [
    ("{kind: generation, prompts: [hi], max_new_tokens: 99999999999999999999999}",
     "checks[0].max_new_tokens must be an integer in [1, 65536]"),
    ("{kind: retention, sets: {a: p.jsonl}, min_score: 0.5, max_new_tokens: 70000}",
     "checks[0].max_new_tokens must be an integer in [1, 65536]"),
    ("{kind: retention, sets: {a: p.jsonl}, min_score: 0.5, limit: 10000000000}",
     "checks[0].limit must be an integer in [1, 2147483647]"),
])
def test_check_integers_are_bounded(tmp_path, check, where):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    _refused(tmp_path, f"version: 1\nchecks:\n  - {check}\n", re.escape(where))


@pytest.mark.parametrize("check", [
    '{kind: structural, name: "struct\\x01ural"}',
    '{kind: structural, name: "two\\nlines"}',
    '{kind: retention, sets: {"nope\\x0b": p.jsonl}, min_score: 0.5}',
])
def test_names_and_set_labels_with_control_characters_are_refused(tmp_path, check):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    _refused(tmp_path, f"version: 1\nchecks:\n  - {check}\n", "must be printable text")


def test_the_data_format_follows_the_path_as_written_not_a_symlink_target(tmp_path):
    # the digest binds the path as written; a symlink re-pointed at a file with the same
    # bytes but another suffix must not change how the data is parsed under that digest
    text = '{"text": "one"}\n\n{"text": "two"}\n'
    (tmp_path / "held.jsonl").write_text(text)
    (tmp_path / "copy.txt").write_text(text)
    os.symlink("held.jsonl", tmp_path / "eval")
    doc = "version: 1\nchecks:\n  - {kind: perplexity, data: eval, max: 9}\n"
    first = _load(tmp_path, doc)
    (tmp_path / "eval").unlink()
    os.symlink("copy.txt", tmp_path / "eval")
    second = _load(tmp_path, doc)
    assert first.digest == second.digest
    from gate.eval_data import read_texts

    read = [read_texts(p.checks[0].data_file("data")) for p in (first, second)]
    # as written: no .jsonl suffix, so blank-line separated text both times
    assert read[0] == read[1] == ['{"text": "one"}', '{"text": "two"}']


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # YAML 1.2 reads 1e-3 as a number, PyYAML as a string: a search space's `lambda: [1e37,
    # 1e38]` was refused as "not a number"; quoted it stays a string
    from gate.safe_yaml import load_yaml

    path = tmp_path / "x.yaml"
    path.write_text('a: 1e-3\nb: [1e+38, 3e38]\nc: 123\nd: "1e3"\ne: -2E2\n')
    assert load_yaml(path) == {"a": 0.001, "b": [1e38, 3e38], "c": 123, "d": "1e3", "e": -200.0}
    import yaml

    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # PyYAML's own loader is untouched


def test_eval_data_with_a_lone_surrogate_is_bad_input_at_load(tmp_path):
    # found by a QA pass: "\ud800" in a retention set made the check error (gate exit 1)
    # with a tokenizer TypeError instead of naming the file and line
    (tmp_path / "a.jsonl").write_text('{"prompt": "ok", "answer": "1"}\n'
                                      '{"prompt": "A dog \\ud800 =", "answer": "x"}\n')
    (tmp_path / "gate.yaml").write_text("version: 1\nchecks:\n  - kind: retention\n    sets:\n"
                                        "      a: a.jsonl\n    min_score: 0.5\n")
    with pytest.raises(BadInputError, match=r"a.jsonl:2: field prompt holds a lone UTF-16 surrogate"):
        load_policy(tmp_path / "gate.yaml")
