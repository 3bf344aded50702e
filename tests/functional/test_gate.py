"""`adapters gate` end to end on a tiny Llama: a good merge passes, broken ones fail.

The world (tests/support/gate.py) has two LoRA adapters trained on disjoint lookup
tasks and three "linear merges" of them pushed with lineage: the exact merge, one
with a NaN weight, one whose task-a factors are random noise. Each gate run is
checked for its exit code, its JSON, its JUnit XML (parsed back), the stored gate
record and the audit entry.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from cli.main import main
from tests.support.gate import GEN_PROMPTS, build_store, world, write_policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    w = world()
    root = tmp_path_factory.mktemp("gate")
    store, versions = build_store(root / "store", w)
    policy = write_policy(root / "gate.yaml", w)
    return w, store, versions, policy, root


def _gate(setup, ref: str, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    w, store, _, policy, _ = setup
    junit = tmp_path / f"{ref}.xml"
    code = main(["gate", ref, "--base", str(w.base), "--policy", str(policy), "--junit", str(junit),
                 "--store", str(store.root), *extra])
    return code, junit


def _cases(junit: Path) -> dict[str, ET.Element]:
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    return {case.get("name"): case for case in suite.iter("testcase")}


def _props(case: ET.Element) -> dict[str, str]:
    return {p.get("name"): p.get("value") for p in case.iter("property")}


def test_good_merge_passes_and_is_recorded(setup, tmp_path, capsys, monkeypatch):
    w, store, versions, policy, _ = setup
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, junit = _gate(setup, "merged", tmp_path, "--json")
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["passed"] is True and out["stored"] is True
    assert [c["status"] for c in out["checks"]] == ["pass"] * 5

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "0" and suite.get("errors") == "0"
    cases = _cases(junit)
    assert set(cases) == {"structural", "merge_equivalence", "perplexity", "retention", "generation"}
    assert all(c.find("failure") is None and c.find("error") is None for c in cases.values())
    assert cases["retention"].get("classname") == "gate.retention"
    props = _props(cases["retention"])
    assert props["adapter-a.baseline"] == "1" and props["adapter-b.baseline"] == "1"
    assert float(props["adapter-a.ratio"]) >= 0.8 and float(props["adapter-b.ratio"]) >= 0.8
    assert float(_props(cases["merge_equivalence"])["max_abs_diff"]) < 1e-3
    assert _props(cases["structural"])["fingerprint"] == "match"

    digest = versions["merged"].digest
    record = store.gate_record(digest, out["policy_digest"])
    assert record is not None and record["passed"] is True
    assert record["candidate_digest"] == digest
    gates = [e for e in store.audit().entries() if e["action"] == "gate"]
    assert gates[-1]["subject"] == versions["merged"].ref and gates[-1]["new"]["passed"] is True
    # the policy's canonical bytes are stored under the policy digest itself
    with store.open_blob(out["policy_digest"]) as handle:
        assert json.loads(handle.read())["policy"]["checks"][0]["kind"] == "structural"
    text = summary.read_text()
    assert "adapterkit gate" in text and "| retention | retention |" in text


def test_nan_merge_fails_structural(setup, tmp_path, capsys):
    code, junit = _gate(setup, "nan-merge", tmp_path)
    captured = capsys.readouterr()
    assert code == 1
    assert "gate failed" in captured.err
    cases = _cases(junit)
    failure = cases["structural"].find("failure")
    assert failure is not None and "NaN" in failure.get("message")
    assert _props(cases["structural"])["nonfinite_tensors"] == "1"
    assert cases["generation"].find("failure") is not None  # NaN logits decode to nothing
    _, store, versions, _, _ = setup
    records = [store.gate_record(versions["nan-merge"].digest, p)
               for c, p, _ in store.gate_pointers() if c == versions["nan-merge"].digest]
    assert records and records[0]["passed"] is False


def test_noise_merge_fails_retention_of_the_destroyed_task(setup, tmp_path, capsys):
    code, junit = _gate(setup, "noisy-merge", tmp_path, "--json")
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["passed"] is False
    cases = _cases(junit)
    assert cases["structural"].find("failure") is None  # finite, well-shaped: only behaviour is off
    failure = cases["retention"].find("failure")
    assert failure is not None and "adapter-a" in failure.get("message")
    props = _props(cases["retention"])
    assert float(props["adapter-a.ratio"]) < 0.8 and props["threshold_min_ratio"] == "0.8"
    assert cases["merge_equivalence"].find("failure") is not None  # not the merge its lineage claims
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("failures")) >= 2


def test_directory_without_lineage_skips_equivalence(setup, tmp_path, capsys):
    """A plain directory (no lineage, nothing recorded) skips merge equivalence."""
    w, store, _, _, root = setup
    policy = write_policy(tmp_path / "p.yaml", w, perplexity=None, retention=None, generation=None,
                          structural=None)
    code = main(["gate", str(w.adapter_a), "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["checks"][0]["status"] == "skip" and out["stored"] is False


@pytest.mark.parametrize("change, field", [
    ({"checks": [{"kind": "retention", "sets": {"a": "x.jsonl"}, "min_ratoi": 0.9}]}, "checks[0]"),
    ({"checks": [{"kind": "perplexity", "data": "missing.jsonl", "max_increase": 0.1}]}, "checks[0].data"),
    ({"checks": [{"kind": "generation", "prompts": GEN_PROMPTS, "max_repeat_fraction": 2}]},
     "checks[0].max_repeat_fraction"),
    ({"version": 2, "checks": []}, "version"),
])
def test_bad_policy_exits_2_naming_the_field(setup, tmp_path, capsys, change, field):
    w, store, _, _, _ = setup
    policy = tmp_path / "bad.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, **change}))
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root)])
    assert code == 2
    assert field in capsys.readouterr().err


def test_missing_base_exits_5(setup, tmp_path, capsys):
    # not found (5), as in unload, quantize and fingerprint (it was 2 here alone)
    _, store, _, policy, _ = setup
    code = main(["gate", "merged", "--base", str(tmp_path / "nope"), "--policy", str(policy),
                 "--store", str(store.root)])
    assert code == 5 and "base model directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["empty", "config only"])
def test_a_base_that_is_not_a_model_exits_2_and_stores_nothing(setup, tmp_path, capsys, content):
    # found by a QA pass: an empty --base errored every check (exit 1) and stored that failing
    # record under the policy, replacing a passing one: a typo un-gated a good candidate
    _, store, _, policy, _ = setup
    base = tmp_path / "not-a-model"
    base.mkdir()
    if content == "config only":
        (base / "config.json").write_text('{"model_type": "llama"}')
    before = list(store.gate_pointers())
    code = main(["gate", "merged", "--base", str(base), "--policy", str(policy),
                 "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 2 and "base model directory" in err and "Traceback" not in err
    assert list(store.gate_pointers()) == before


def test_a_short_generation_is_reported_with_its_length_not_as_empty(setup, tmp_path, capsys):
    # found by a QA pass: with min_chars 1000, "A owl =" -> "hoot" was reported "empty output"
    w, store, _, _, _ = setup
    policy = write_policy(tmp_path / "p.yaml", w, perplexity=None, retention=None, structural=None,
                          merge_equivalence=None,
                          generation={"kind": "generation", "prompts": GEN_PROMPTS[:1],
                                      "max_new_tokens": 4, "min_chars": 1000})
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--json"])
    doc = json.loads(capsys.readouterr().out)
    check = doc["checks"][0]
    chars = len("".join(check["details"][0]["output"].split()))
    assert code == 1 and check["status"] == "fail" and chars > 0
    # a failing verdict carries the error fields every failing command's JSON has
    assert doc["exit_code"] == 1 and doc["error"] == "GateFailedError" and doc["passed"] is False
    assert doc["message"] == "gate failed: 1 of 1 checks did not pass (generation)" and doc["fix"]
    assert check["message"] == (f"output of {chars} non-space characters (< min_chars 1000) "
                                "for 'A cat ='")


def test_a_bfloat16_gate_says_why_an_exact_merge_misses_a_float32_threshold(setup, tmp_path, capsys):
    # found on the H200: the demo's policy (max_abs_diff 0.001) with dtype bfloat16 failed the
    # exact linear merge of a 7B-shaped model, with no word on why
    w, store, _, _, _ = setup
    policy = write_policy(tmp_path / "p.yaml", w, perplexity=None, retention=None, structural=None,
                          generation=None)
    doc = yaml.safe_load(policy.read_text())
    policy.write_text(yaml.safe_dump({**doc, "dtype": "bfloat16"}, sort_keys=False))
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--json"])
    check = json.loads(capsys.readouterr().out)["checks"][0]
    assert code == 1 and check["status"] == "fail"
    assert "bfloat16 evaluation rounds logits near" in check["message"]
    assert "set the policy's dtype to float32, or allow max_abs_diff >=" in check["message"]
    doc["checks"][0]["max_abs_diff"] = float(check["message"].rsplit(">= ", 1)[1].rstrip(")"))
    policy.write_text(yaml.safe_dump({**doc, "dtype": "bfloat16"}, sort_keys=False))
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--json"])
    assert code == 0, capsys.readouterr().out  # the threshold the hint names passes it


@pytest.mark.parametrize("junit", ["dir", "", "file/under"])
def test_a_junit_path_that_cannot_be_a_file_is_refused_before_anything_is_recorded(
        setup, tmp_path, capsys, monkeypatch, junit):
    # found by a CLI contract pass: the gate ran, stored and audited its record, then failed
    # writing the report (exit 6, the verdict never printed)
    w, store, _, policy, _ = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    before = list(store.gate_pointers())
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--junit", junit, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["exit_code"] == 2 and "--junit" in out["message"]
    assert list(store.gate_pointers()) == before


def test_a_file_given_as_the_base_or_model_is_bad_input_not_missing(setup, tmp_path, capsys):
    # found by a CLI contract pass: both said "not found" (exit 5) for a path that exists, and
    # quantize's fix named a --base option it does not have
    w, store, _, policy, _ = setup
    file = tmp_path / "weights.bin"
    file.write_text("x")
    code = main(["gate", "merged", "--base", str(file), "--policy", str(policy),
                 "--store", str(store.root), "--no-record"])
    assert code == 2 and "is a file, not a model directory" in capsys.readouterr().err
    code = main(["quantize", str(file), "--to", "nf4", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a model directory" in err and "--base" not in err
    assert not (tmp_path / "q").exists()


def test_gate_json_leaves_stderr_free_of_library_chatter(setup, tmp_path):
    # found by a CLI contract pass: bitsandbytes' "Failed to load CPU gemm_4bit_forward ..."
    # and transformers' FutureWarning pair reached stderr of `gate --json`
    import os
    import subprocess
    import sys

    w, store, _, policy, _ = setup
    done = subprocess.run([sys.executable, "-m", "cli.main", "gate", "merged", "--base", str(w.base),
                           "--policy", str(policy), "--store", str(store.root), "--no-record",
                           "--json"], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True
    assert "Warning" not in done.stderr and "kernels-community" not in done.stderr, done.stderr


def test_running_out_of_memory_in_a_check_is_exit_6_and_records_nothing(setup, tmp_path, capsys,
                                                                        monkeypatch):
    # found by a review: a check's out-of-memory became a failing check (exit 1) and a stored
    # failing record, though out of memory is the machine's (exit 6), not the candidate's
    from gate.evaluate import Evaluator

    w, store, _, _, _ = setup
    policy = write_policy(tmp_path / "p.yaml", w, merge_equivalence=None, retention=None,
                          generation=None, structural=None)

    def oom(*_args, **_kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "8589934592 bytes")

    monkeypatch.setattr(Evaluator, "perplexity", oom)
    before = list(store.gate_pointers())
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 6 and out["exit_code"] == 6 and out["message"].startswith("out of memory")
    assert list(store.gate_pointers()) == before


def test_a_no_record_gate_runs_on_a_store_it_may_not_write(setup, tmp_path, capsys, monkeypatch):
    # found by a CLI contract pass (a read-only bind mount): `gate --no-record` only reads the
    # store but made its work directory in the store's tmp/, and failed with exit 6
    import os

    w, store, _, _, _ = setup
    policy = write_policy(tmp_path / "p.yaml", w, merge_equivalence=None, retention=None,
                          generation=None, perplexity=None)
    real = os.access
    root = str(store.root)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k:
                        False if str(path).startswith(root) and mode & os.W_OK else real(path, mode, *a, **k))
    import errno

    import gate.runner

    def read_only(*_args, **_kwargs):  # what mkdtemp in a read-only tmp/ raises
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(gate.runner, "leased_temp_dir", read_only)
    code = main(["gate", "merged", "--base", str(w.base), "--policy", str(policy),
                 "--store", str(store.root), "--no-record", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["stored"] is False and json.loads(out)["passed"] is True
