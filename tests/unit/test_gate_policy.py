"""Gate policy validation and digest, report rendering and the scoring helpers (no models)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from gate.checks.merge_equivalence import coefficients
from gate.eval_data import read_pairs, read_texts
from gate.evaluate import answer_matches, repeat_fraction
from gate.policy import load_policy, parse_policy
from gate.records import failed_summary
from gate.report import append_step_summary, to_junit, to_markdown
from gate.results import CheckResult, GateResult
from registry.errors import BadInputError

GOOD = {
    "version": 1,
    "checks": [
        {"kind": "structural", "max_rank": 64},
        {"kind": "merge_equivalence", "prompts": ["hello there"]},
        {"kind": "perplexity", "data": "data/heldout.jsonl", "max_increase": 0.05},
        {"kind": "retention", "sets": {"adapter-a": "data/a.jsonl"}, "min_ratio": 0.9},
        {"kind": "generation", "prompts": ["Say hi."]},
    ],
}


def _write(tmp_path: Path, doc: object = GOOD) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "heldout.jsonl").write_text('{"text": "a b c"}\n')
    (data / "a.jsonl").write_text('{"prompt": "A cat =", "answer": "meow"}\n')
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_defaults_are_filled_and_paths_resolved(tmp_path):
    policy = load_policy(_write(tmp_path))
    assert [c.kind for c in policy.checks] == ["structural", "merge_equivalence", "perplexity",
                                               "retention", "generation"]
    assert policy.seed == 0 and policy.dtype == "float32"
    ppl = policy.checks[2]
    assert ppl["baseline"] == "base" and ppl["max"] is None
    assert ppl.data_file("data").path == (tmp_path / "data" / "heldout.jsonl").resolve()
    assert ppl.data_file("data").data == (tmp_path / "data" / "heldout.jsonl").read_bytes()
    assert policy.checks[3]["metric"] == "exact_match"
    assert policy.digest.startswith("sha256:") and len(policy.digest) == 71
    assert set(policy.data_digests) == {"data/heldout.jsonl", "data/a.jsonl"}


def test_digest_is_stable_and_location_independent(tmp_path):
    (tmp_path / "one").mkdir()
    first = load_policy(_write(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    again = load_policy(tmp_path / "two" / "gate.yaml")
    assert first.digest == again.digest
    # explicit defaults describe the same policy
    explicit = json.loads(json.dumps(GOOD))
    explicit["seed"] = 0
    explicit["checks"][4]["max_repeat_fraction"] = 0.5
    (tmp_path / "two" / "gate.yaml").write_text(yaml.safe_dump(explicit))
    assert load_policy(tmp_path / "two" / "gate.yaml").digest == first.digest


def test_digest_changes_with_thresholds_and_data(tmp_path):
    base = load_policy(_write(tmp_path)).digest
    changed = json.loads(json.dumps(GOOD))
    changed["checks"][3]["min_ratio"] = 0.8
    assert load_policy(_write(tmp_path, changed)).digest != base
    _write(tmp_path)
    (tmp_path / "data" / "a.jsonl").write_text('{"prompt": "A cat =", "answer": "purr"}\n')
    assert load_policy(tmp_path / "gate.yaml").digest != base


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(checks=[]), "checks"),
    (lambda d: d.update(dtype="int8"), "dtype"),
    (lambda d: d["checks"][0].update(max_rank=0), "checks[0].max_rank"),
    (lambda d: d["checks"][0].update(kind="vibes"), "checks[0].kind"),
    (lambda d: d["checks"][1].pop("prompts"), "checks[1].prompts"),
    (lambda d: d["checks"][2].pop("max_increase"), "checks[2].max_increase"),
    (lambda d: d["checks"][2].update(baseline="yesterday"), "checks[2].baseline"),
    (lambda d: d["checks"][2].update(max_increase="5%"), "checks[2].max_increase"),
    (lambda d: d["checks"][3].update(min_ratoi=0.9), "checks[3].min_ratoi"),
    (lambda d: d["checks"][3].update(sets={}), "checks[3].sets"),
    (lambda d: d["checks"][3].update(metric="bleu"), "checks[3].metric"),
    (lambda d: d["checks"][3].update(sets={"a": "data/missing.jsonl"}), "checks[3].sets.a"),
    (lambda d: d["checks"][4].update(prompts=[]), "checks[4].prompts"),
    (lambda d: d["checks"][4].update(max_repeat_fraction=True), "checks[4].max_repeat_fraction"),
    (lambda d: d["checks"].append({"kind": "structural"}), "checks[5].name"),
])
def test_invalid_fields_are_named(tmp_path, mutate, field):
    doc = json.loads(json.dumps(GOOD))
    mutate(doc)
    with pytest.raises(BadInputError) as info:
        load_policy(_write(tmp_path, doc))
    assert field in info.value.message
    assert info.value.exit_code == 2


def test_repeated_kinds_need_distinct_names(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["checks"].append({"kind": "generation", "name": "generation-long", "prompts": ["x"],
                          "max_new_tokens": 64})
    assert [c.name for c in load_policy(_write(tmp_path, doc)).checks][-1] == "generation-long"


def test_unreadable_files(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_policy(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("checks: [unclosed\n")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_policy(tmp_path / "bad.yaml")
    with pytest.raises(BadInputError, match="root"):
        parse_policy(["a list"], base_dir=tmp_path)


# --- helpers used by the checks --------------------------------------------------

def test_repeat_fraction():
    assert repeat_fraction([], 3) == 0.0
    assert repeat_fraction([1, 2, 3, 4, 5], 3) == 0.0
    assert repeat_fraction([7] * 10, 2) == pytest.approx(1 - 1 / 9)
    assert repeat_fraction([1, 2], 3) == 0.0  # shorter than n: one gram, no repeats


@pytest.mark.parametrize("pred, answer, ok", [
    ("meow", "meow", True), ("  meow  ", "meow", True), ("meow woof", "meow", True),
    ("Paris.", "Paris", True), ("Parisian", "Paris", False), ("", "meow", False),
    ("MEOW", "meow", False), ("new  york city", "new york", True),
])
def test_answer_matches(pred, answer, ok):
    assert answer_matches(pred, answer) is ok


def test_answer_matches_case_insensitive():
    assert answer_matches("MEOW", "meow", case_sensitive=False)


def test_read_texts_and_pairs(tmp_path):
    (tmp_path / "t.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert read_texts(tmp_path / "t.txt") == ["first doc\nstill first", "second doc"]
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n\n{"body": "y", "text": "z"}\n')
    assert read_texts(tmp_path / "t.jsonl") == ["x", "z"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "answer": "a"}\n{"prompt": 1}\n')
    with pytest.raises(BadInputError, match=r"bad.jsonl:2"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "p.jsonl").write_text('{"prompt": "q", "answer": "a"}\n' * 3)
    assert read_pairs(tmp_path / "p.jsonl", limit=2) == [("q", "a"), ("q", "a")]


def test_merge_coefficients():
    assert coefficients("linear", {}, [0.5, 0.5]) == [0.5, 0.5]
    assert coefficients("linear", {"normalize": True}, [1.0, 3.0]) == [0.25, 0.75]
    assert coefficients("task_arithmetic", {"lambda": 2.0}, [0.5, None]) == [1.0, 2.0]


# --- reports ---------------------------------------------------------------------

def _result() -> GateResult:
    return GateResult(
        candidate="m@sha256:" + "a" * 64, candidate_digest="sha256:" + "a" * 64,
        policy_digest="sha256:" + "b" * 64, passed=False, base="/models/base",
        checks=(CheckResult("structural", "structural", "pass", "ok", {"tensors": 20}),
                CheckResult("retention", "retention", "fail", "adapter-a: 0.10 < 0.9 | x",
                            {"adapter-a.ratio": 0.1, "threshold_min_ratio": 0.9}, [{"set": "a"}]),
                CheckResult("equiv", "merge_equivalence", "skip", "method 'ties' is not linear"),
                CheckResult("generation", "generation", "error", "RuntimeError: boom")),
        meta={"started": "2026-01-01T00:00:00Z"})


def test_junit_round_trip(tmp_path):
    tree = to_junit(_result())
    path = tmp_path / "r.xml"
    tree.write(path, encoding="utf-8", xml_declaration=True)
    suite = ET.parse(path).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == \
        ("4", "1", "1", "1")
    suite_props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert suite_props["passed"] == "false" and suite_props["policy_digest"].endswith("b" * 64)
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failure = cases["retention"].find("failure")
    assert failure.get("message") == "adapter-a: 0.10 < 0.9 | x"
    assert json.loads(failure.text) == [{"set": "a"}]
    props = {p.get("name"): p.get("value") for p in cases["retention"].iter("property")}
    assert props == {"adapter-a.ratio": "0.1", "threshold_min_ratio": "0.9"}
    assert cases["equiv"].find("skipped") is not None
    assert cases["generation"].find("error").get("message") == "RuntimeError: boom"
    assert cases["structural"].find("failure") is None


def test_markdown_and_step_summary(tmp_path, monkeypatch):
    text = to_markdown(_result())
    assert "❌ **failed**" in text and "0.10 < 0.9 \\| x" in text  # pipes escaped
    assert "min_ratio=0.9" in text
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_step_summary(_result()) is None
    target = tmp_path / "summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    append_step_summary(_result())
    assert target.read_text().startswith("earlier step\n### adapterkit gate")


def test_result_json_round_trip_and_failed_summary():
    result = _result()
    again = GateResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result
    assert [c.name for c in result.failed] == ["retention", "generation"]
    summary = failed_summary(result.to_json())
    assert "retention (fail: adapter-a" in summary and "generation (error" in summary


def test_documented_example_policy_is_valid(tmp_path):
    """examples/gate.yaml validates once the eval files it names exist."""
    example = Path(__file__).resolve().parents[2] / "examples" / "gate.yaml"
    doc = yaml.safe_load(example.read_text())
    for check in doc["checks"]:
        for rel in [check.get("data")] + list((check.get("sets") or {}).values()):
            if rel:
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / rel).write_text('{"prompt": "p", "answer": "a"}\n')
    shutil.copy(example, tmp_path / "gate.yaml")
    policy = load_policy(tmp_path / "gate.yaml")
    assert [c.kind for c in policy.checks] == ["structural", "merge_equivalence", "perplexity",
                                               "retention", "generation", "drift"]


def test_exponent_numbers_in_yaml(tmp_path):
    """PyYAML reads `1e-3` as a string; thresholds accept it as the number it means."""
    path = _write(tmp_path)
    path.write_text(path.read_text().replace("- kind: merge_equivalence",
                                             "- kind: merge_equivalence\n  max_abs_diff: 1e-3"))
    assert load_policy(path).checks[1]["max_abs_diff"] == 0.001


def test_junit_stays_parseable_with_control_characters_in_messages(tmp_path):
    # found by a QA pass: a model's generation (or a data label) holding \x01 or \x0b made
    # the JUnit file unreadable for every CI consumer
    result = GateResult(
        candidate="m\x01", candidate_digest="sha256:" + "a" * 64, policy_digest="sha256:" + "b" * 64,
        passed=False, base="/b", meta={"started": "2026-01-01T00:00:00Z"},
        checks=(CheckResult("generation", "generation", "fail", "degenerate: 'ab\x0bc\x00'",
                            {"sample\x02": "x\x1b[31m"}, [{"text": "\ud800 lone"}]),))
    path = tmp_path / "r.xml"
    to_junit(result).write(path, encoding="utf-8", xml_declaration=True)
    root = ET.parse(path).getroot()
    failure = next(root.iter("failure"))
    assert failure.get("message") == "degenerate: 'ab\\x0bc\\x00'"
    props = {p.get("name"): p.get("value") for p in next(root.iter("testcase")).iter("property")}
    assert props == {"sample\\x02": "x\\x1b[31m"}
    assert "\\ud800 lone" in failure.text
