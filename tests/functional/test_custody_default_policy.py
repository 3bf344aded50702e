"""Promotion of derived models, chain of custody, and the built-in default policy.

The lineage is real (the tiny gate world's ``merged`` adapter, unloaded into its base,
then quantized to nf4, both recorded by the CLI). The promotion rules are about gate
records, so most records here are written through the store's own audited API
(``Store.put_gate_record`` after ``put_bytes`` of the policy, as the gate runner does)
rather than by evaluating models; one test runs the real gate under the default
policy end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli.main import main
from gate.default_policy import default_digest, default_policy, default_policy_yaml
from gate.policy import load_policy
from tests.support.cli import run, run_json
from tests.support.gate import build_store, world, write_policy

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """``(world, store, versions, policy)``: merged -> unloaded -> nf4 recorded, and a
    policy with ``require_source_gate: true``."""
    root = tmp_path_factory.mktemp("custody")
    w = world()
    store, versions = build_store(root / "store", w)
    for args in (["unload", "merged", "--base", str(w.base), "--out", str(root / "unloaded")],
                 ["quantize", str(root / "unloaded"), "--to", "nf4", "--out", str(root / "nf4"),
                  "--name", "merged-nf4"]):
        assert main([*args, "--store", str(store.root), "--json"]) == 0
    versions["unloaded"] = store.resolve("merged-unloaded")
    versions["nf4"] = store.resolve("merged-nf4")
    path = write_policy(root / "gate.yaml", w, merge_equivalence=None, perplexity=None,
                        generation=None)
    raw = yaml.safe_load(path.read_text())
    raw["require_source_gate"] = True
    path.write_text(yaml.safe_dump(raw))
    return w, store, versions, path, root


def _record(store, version, policy, passed: bool = True) -> None:
    """A gate record made the way gate/runner.py stores one."""
    store.put_bytes(policy.canonical_bytes())
    store.put_gate_record(version.digest, policy.digest, {
        "candidate": version.ref, "candidate_digest": version.digest,
        "policy_digest": policy.digest, "passed": passed,
        "checks": [{"name": "structural", "status": "pass" if passed else "fail",
                    "message": "ok" if passed else "broken"}]})


def _promote(store, ref: str, *extra: str) -> int:
    return main(["promote", ref, "--to", "release", "--store", str(store.root), *extra])


def test_policy_field_and_digest_stability(chain, tmp_path) -> None:
    _, _, _, path, _ = chain
    pol = load_policy(path)
    assert pol.require_source_gate is True
    assert json.loads(pol.canonical_bytes())["policy"]["require_source_gate"] is True
    raw = yaml.safe_load(path.read_text())
    raw["require_source_gate"] = False
    off = path.parent / "off.yaml"
    off.write_text(yaml.safe_dump(raw))
    del raw["require_source_gate"]
    absent = path.parent / "absent.yaml"
    absent.write_text(yaml.safe_dump(raw))
    assert load_policy(off).digest == load_policy(absent).digest != pol.digest
    raw["require_source_gate"] = "yes"
    absent.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="require_source_gate must be true or false"):
        load_policy(absent)


def test_quantized_model_of_ungated_merge_is_refused(chain, capsys) -> None:
    _, store, versions, path, _ = chain
    pol = load_policy(path)
    assert [p["role"] for p in versions["nf4"].lineage["parents"]] == ["source"]
    _record(store, versions["nf4"], pol)
    _record(store, versions["unloaded"], pol)
    code, err = run_json(capsys, "promote", "merged-nf4", "--to", "release", "--policy", path,
                         "--store", store.root)
    assert code == 1 and err["error"] == "GateFailedError"
    assert "chain of custody" in err["message"] and "merged@sha256:" in err["message"]
    assert "merged-unloaded@sha256:" in err["message"]  # whose parent it is
    assert "release" not in store.aliases("merged-nf4")
    # a failed record of the merge is no better than none
    _record(store, versions["merged"], pol, passed=False)
    code, err = run_json(capsys, "promote", "merged-nf4", "--to", "release", "--policy", path,
                         "--store", store.root)
    assert code == 1 and "failed the gate" in err["message"]
    # the merge passes: the whole chain is gated (the adapters a and b need no record)
    _record(store, versions["merged"], pol)
    code, data = run_json(capsys, "promote", "merged-nf4", "--to", "release", "--policy", path,
                          "--store", store.root)
    assert code == 0, data
    assert data["custody"] == [versions["unloaded"].ref, versions["merged"].ref]
    assert store.aliases("merged-nf4")["release"] == versions["nf4"].digest


def test_derived_model_needs_its_own_record_and_custody_is_optional(chain, capsys, tmp_path) -> None:
    w, store, versions, path, _ = chain
    plain = write_policy(tmp_path / "plain.yaml", w, merge_equivalence=None, perplexity=None,
                         generation=None)
    pol = load_policy(plain)
    code, err = run_json(capsys, "promote", "merged-unloaded", "--to", "release", "--policy",
                         plain, "--store", store.root)
    assert code == 1 and "no gate record for merged-unloaded@sha256:" in err["message"]
    _record(store, versions["unloaded"], pol)  # the merge is not gated under this policy
    code, data = run_json(capsys, "promote", "merged-unloaded", "--to", "release", "--policy",
                          plain, "--store", store.root)
    assert code == 0 and data["custody"] == []


def test_custody_fails_closed_without_the_policy_content(chain, capsys, tmp_path) -> None:
    from gate.custody import requires_source_gate
    from registry.errors import GateFailedError

    _, store, _, path, _ = chain
    pol = load_policy(path)
    store.put_bytes(pol.canonical_bytes())  # what every gate run stores
    assert requires_source_gate(store, pol.digest) is True  # from the blob
    with pytest.raises(GateFailedError, match="cannot read policy"):
        requires_source_gate(store, "sha256:" + "0" * 64)


def test_print_default_policy_is_a_loadable_copy(tmp_path, capsys) -> None:
    code, text, _ = run(capsys, "gate", "--print-default-policy")
    assert code == 0 and text == default_policy_yaml()
    copy = tmp_path / "gate.yaml"
    copy.write_text(text)
    (tmp_path / "heldout_en.txt").write_bytes(
        (Path(__file__).resolve().parents[2] / "gate" / "data" / "heldout_en.txt").read_bytes())
    assert load_policy(copy).digest == default_digest()
    kinds = [c.kind for c in default_policy().checks]
    assert kinds[:3] == ["structural", "generation", "perplexity"]
    perplexity = default_policy().checks[2]
    assert perplexity["baseline"] == "base" and perplexity["max_increase"] == 0.10
    assert len(perplexity.data_file("data").read_text()) > 3000
    # --json (found by a QA pass: it printed YAML): one JSON document holding the same text
    code, text, _ = run(capsys, "gate", "--print-default-policy", "--json")
    data = json.loads(text)
    assert code == 0 and data["digest"] == default_digest()
    assert default_policy_yaml().endswith(data["yaml"])


def test_gate_uses_the_default_and_promote_refuses_it_until_pinned(tmp_path, capsys) -> None:
    w = world()
    store, _ = build_store(tmp_path / "store", w)
    code, data = run_json(capsys, "gate", "merged", "--base", w.base, "--store", store.root)
    assert code in (0, 1), data
    assert data["default_policy"] is True and data["policy_digest"] == default_digest()
    assert data["meta"]["policy_source"] == "adapterkit built-in default policy"
    assert data["stored"] is True
    code, _, err = run(capsys, "gate", "merged", "--base", w.base, "--store", store.root,
                       "--no-record")
    assert "built-in default policy" in err
    _record(store, store.resolve("merged"), default_policy())  # passing, to test the rule
    copy = tmp_path / "mine.yaml"
    copy.write_text(default_policy_yaml())
    (tmp_path / "heldout_en.txt").write_text(default_policy().checks[2].data_file("data").read_text())
    # a copy of the default has the default's digest: not accepted unless pinned
    code, err = run_json(capsys, "promote", "merged", "--to", "release", "--policy", copy,
                         "--store", store.root)
    assert code == 1 and "built-in default" in err["message"], err
    assert "release" not in store.aliases("merged")
    config = json.loads((store.root / "config.json").read_text())
    for pin in ({"digest": default_digest()}, {"path": str(copy)}):
        (store.root / "config.json").write_text(json.dumps({**config, "gate_policy": pin}))
        code, data = run_json(capsys, "promote", "merged", "--to", "release",
                              "--store", store.root)
        assert code == 0, data
    assert store.aliases("merged")["release"] == store.resolve("merged").digest
