"""Policy and eval-data inputs that used to be misread or crash (found by a QA fuzz pass).

Each test feeds the input that broke the loader and checks the value read back, or
the exit code (2) and the one-line message naming the field:

* eval text with CRLF or CR line ends was one document (perplexity changed, a gate
  flipped); a BOM stayed in the first document; JSONL lines were split inside strings
  at U+2028, U+2029 or U+0085 (``str.splitlines``);
* ``.ndjson`` / ``.JSONL`` files were read as plain text (JSON source scored as
  English); a ``.json`` file and a non-default ``field`` on plain text were ignored;
* blank JSONL texts passed loading and failed the gate at run time;
* control characters, a NUL in a data path, or a lone surrogate anywhere in a policy
  crashed the loader (exit 70);
* ``merge_equivalence.methods`` took any string (a typo turned the check off);
  ``release`` took any string (the gate failed later, exit 1); ``version: true`` and
  ``version: 1.0`` passed; a quoted ``"1e-3"`` passed where ``"0.001"`` is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gate.eval_data import DataFile, read_pairs, read_texts
from gate.policy import load_policy
from registry.errors import BadInputError

LF = b"the cat\nsat\n\nthe dog\n\nthe cow\n"


def _file(data: bytes, written: str = "h.txt") -> DataFile:
    return DataFile(path=Path(written), data=data, written=written)


@pytest.mark.parametrize("data", [LF, LF.replace(b"\n", b"\r\n"), LF.replace(b"\n", b"\r"),
                                  b"\xef\xbb\xbf" + LF.replace(b"\n", b"\r\n")])
def test_plain_text_documents_do_not_depend_on_line_ends_or_a_bom(data):
    assert read_texts(_file(data)) == ["the cat\nsat", "the dog", "the cow"]
    assert read_texts(_file(data), limit=2) == ["the cat\nsat", "the dog"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])  # raw C0 controls are not JSON
def test_jsonl_strings_may_hold_any_character_json_allows(char):
    text = f"a{char}b"
    line = '{"text": "' + text + '"}'  # raw, unescaped: valid JSON
    assert read_texts(_file(f"{line}\r\n{line}\n".encode(), "h.jsonl")) == [text, text]
    pair = '{"prompt": "' + text + '", "answer": "x"}'
    assert read_pairs(_file(("\ufeff" + pair + "\r\n").encode(), "s.jsonl")) == [(text, "x")]


@pytest.mark.parametrize("name", ["h.ndjson", "h.JSONL", "h.NdJson"])
def test_jsonl_suffixes_in_any_case_are_read_as_jsonl(name):
    data = b'{"text": "the cat"}\n{"text": "the dog"}\n'
    assert read_texts(_file(data, name)) == ["the cat", "the dog"]


def test_a_json_file_is_refused_rather_than_scored_as_text():
    with pytest.raises(BadInputError, match=r"\.json file"):
        read_texts(_file(b'[{"text": "the cat"}]', "h.json"))


def test_blank_jsonl_texts_are_skipped_and_a_file_of_only_blanks_is_refused():
    data = b'{"text": ""}\n{"text": "the cat"}\n{"text": "  "}\n{"text": "the dog"}\n'
    assert read_texts(_file(data, "h.jsonl"), limit=2) == ["the cat", "the dog"]
    with pytest.raises(BadInputError, match="holds no text"):
        read_texts(_file(b'{"text": ""}\n{"text": " \\n "}\n', "h.jsonl"))


def _policy(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "heldout.txt").write_text("the cat sat\n\nthe dog ran\n")
    (data / "heldout.jsonl").write_text('{"text": "a b c"}\n')
    (data / "blank.jsonl").write_text('{"text": ""}\n')
    path = tmp_path / "gate.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


def _refused(tmp_path: Path, text: str, *fragments: str) -> str:
    with pytest.raises(BadInputError) as info:
        load_policy(_policy(tmp_path, text))
    err = info.value
    assert err.exit_code == 2 and err.fix and "\n" not in err.message
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err.message


CHECK = "version: 1\nchecks:\n  - kind: "


@pytest.mark.parametrize("char", ["\x0c", "\x01", "\x7f", "\x1b"])
def test_a_control_character_anywhere_is_bad_input_not_a_crash(tmp_path, char):
    _refused(tmp_path, f"{CHECK}structural\n# a comment {char}\n", "not valid YAML")


def test_a_nul_in_a_data_path_is_refused_naming_the_field(tmp_path):
    _refused(tmp_path, f'{CHECK}perplexity\n    data: "data/x\\0.jsonl"\n    max: 5\n',
             "checks[0].data", "NUL")
    _refused(tmp_path, f'{CHECK}retention\n    sets: {{a: "data/\\0"}}\n    min_ratio: 0.5\n',
             "checks[0].sets.a", "NUL")


@pytest.mark.parametrize("text", [
    f'{CHECK}generation\n    prompts: ["\\ud800"]\n',
    f'{CHECK}perplexity\n    data: "data/\\udfff.txt"\n    max: 5\n',
    'version: 1\nrelease: "x\\ud800"\nchecks:\n  - kind: structural\n',
    f'{CHECK}structural\n    "\\ud800": 1\n',
])
def test_a_lone_surrogate_anywhere_is_bad_input_not_a_crash(tmp_path, text):
    _refused(tmp_path, text, "lone UTF-16 surrogate")


def test_merge_equivalence_methods_must_be_linear_family_names(tmp_path):
    base = f"{CHECK}merge_equivalence\n    prompts: [x]\n    methods: "
    _refused(tmp_path, base + "[Linear]\n", "checks[0].methods[0]", "must be one of linear")
    _refused(tmp_path, base + "[linear, ties]\n", "checks[0].methods[1]")
    policy = load_policy(_policy(tmp_path, base + "[task_arithmetic]\n"))
    assert policy.checks[0]["methods"] == ["task_arithmetic"]


@pytest.mark.parametrize("ref", ["../x", '"a\\nb"', "name@zz", '"a:"'])
def test_release_must_be_a_registry_ref(tmp_path, ref):
    _refused(tmp_path, f"version: 1\nrelease: {ref}\nchecks:\n  - kind: structural\n",
             "policy field release", "registry ref")


def test_a_valid_release_ref_loads(tmp_path):
    text = "version: 1\nrelease: smollm2-skills:release\nchecks:\n  - kind: structural\n"
    assert load_policy(_policy(tmp_path, text)).release == "smollm2-skills:release"


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_version_must_be_the_integer_one(tmp_path, version):
    _refused(tmp_path, f"version: {version}\nchecks:\n  - kind: structural\n",
             "policy field version", "integer 1")


def test_a_quoted_number_is_refused_like_any_string(tmp_path):
    check = f"{CHECK}merge_equivalence\n    prompts: [x]\n    max_abs_diff: "
    _refused(tmp_path, check + '"1e-3"\n', "checks[0].max_abs_diff")
    _refused(tmp_path, check + '"0.001"\n', "checks[0].max_abs_diff")
    assert load_policy(_policy(tmp_path, check + "1e-3\n")).checks[0]["max_abs_diff"] == 0.001


def test_a_jsonl_field_on_plain_text_is_refused(tmp_path):
    check = f"{CHECK}perplexity\n    max: 5\n    data: "
    _refused(tmp_path, check + "data/heldout.txt\n    field: content\n",
             "checks[0].field", "plain text")
    for ok in ("data/heldout.txt\n    field: text\n", "data/heldout.jsonl\n    field: text\n"):
        assert load_policy(_policy(tmp_path, check + ok)).checks[0]["field"] == "text"


def test_a_jsonl_file_of_blank_texts_is_refused_when_the_policy_loads(tmp_path):
    _refused(tmp_path, f"{CHECK}perplexity\n    max: 5\n    data: data/blank.jsonl\n",
             "checks[0].data", "holds no text")



def test_merge_equivalence_rounding_hint_names_the_16_bit_step() -> None:
    from gate.checks.merge_equivalence import rounding_hint

    assert "steps of 0.015625" in rounding_hint("bfloat16", 0.0156, 3.0)  # one step at logits 2-4
    assert "steps of 0.001953125" in rounding_hint("float16", 0.004, 3.0)
    # the threshold it names passes a difference of 8 steps exactly (a rounded 0.0156 did not)
    hint = rounding_hint("float16", 0.015625, 3.0)
    assert 0.015625 <= float(hint.rsplit(">= ", 1)[1].rstrip(")"))
    assert rounding_hint("bfloat16", 0.01, float("nan")) == rounding_hint("bfloat16", 0.01, 0.0) == ""
    assert rounding_hint("float32", 0.0156, 3.0) == ""
    assert rounding_hint("bfloat16", 0.2, 3.0) == ""  # 13 steps: more than rounding
    assert rounding_hint("bfloat16", float("inf"), 3.0) == ""
