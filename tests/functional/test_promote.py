"""`adapters promote` and `adapters alias history`: the release alias moves only through the gate.

Every gate record here comes from a real gate run (:func:`gate.runner.run_gate`);
the policy keeps the structural and retention checks only, which is enough to pass
the exact merge and fail the noisy one and keeps each run to a few seconds.
"""

from __future__ import annotations

import json

import pytest
import yaml

from cli.main import main
from gate.policy import load_policy
from gate.runner import run_gate
from tests.support.gate import build_store, world, write_policy


@pytest.fixture()
def setup(tmp_path):
    w = world()
    store, versions = build_store(tmp_path / "store", w)
    policy = write_policy(tmp_path / "gate.yaml", w, merge_equivalence=None, perplexity=None,
                          generation=None)
    return w, store, versions, policy


def _promote(store, *args: str) -> int:
    return main(["promote", *args, "--store", str(store.root)])


def _audit(store, action: str) -> list[dict]:
    return [e for e in store.audit().entries() if e["action"] == action]


@pytest.fixture()
def gated(setup):
    """The setup with a passing gate record for ``merged`` under the policy."""
    w, store, versions, policy = setup
    result = run_gate("merged", w.base, policy, store=store)
    assert result.passed and result.stored
    return setup


def test_refused_without_gate_record(setup, capsys):
    _, store, versions, policy = setup
    code = _promote(store, "merged", "--to", "release", "--policy", str(policy))
    err = capsys.readouterr().err
    assert code == 1
    assert "no gate record" in err and "merged@sha256:" in err
    assert "release" not in store.aliases("merged")
    assert not _audit(store, "promote")


def test_allowed_with_passing_record(gated, capsys):
    _, store, versions, policy = gated
    code = _promote(store, "merged", "--to", "release", "--policy", str(policy), "--json")
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["forced"] is False and out["gate_passed"] is True
    assert store.aliases("merged")["release"] == versions["merged"].digest
    entry = _audit(store, "promote")[-1]
    assert entry["subject"] == "merged:release" and entry["new"] == versions["merged"].digest


def test_refused_when_the_record_failed_names_the_check(setup, capsys):
    w, store, versions, policy = setup
    result = run_gate("noisy-merge", w.base, policy, store=store)
    assert not result.passed
    code = _promote(store, "noisy-merge", "--to", "release", "--policy", str(policy))
    err = capsys.readouterr().err
    assert code == 1
    assert "failed the gate" in err and "retention" in err and "adapter-a" in err
    assert "release" not in store.aliases("noisy-merge")


def test_record_is_bound_to_the_policy_digest(gated, capsys):
    """Editing the policy (or its eval data) means the old record no longer counts."""
    w, store, _, policy = gated
    stricter = write_policy(policy.parent / "stricter.yaml", w, merge_equivalence=None,
                            perplexity=None)
    assert load_policy(stricter).digest != load_policy(policy).digest
    assert _promote(store, "merged", "--to", "release", "--policy", str(stricter)) == 1
    assert "no gate record" in capsys.readouterr().err


def test_policy_from_store_config(gated, capsys):
    w, store, versions, policy = gated
    config = json.loads((store.root / "config.json").read_text())
    (store.root / "config.json").write_text(json.dumps({**config, "gate_policy": str(policy)}))
    assert _promote(store, "merged", "--to", "release") == 0
    # a pinned digest that no longer matches the file is bad input, not a silent pass
    (store.root / "config.json").write_text(json.dumps(
        {**config, "gate_policy": {"path": str(policy), "digest": "sha256:" + "0" * 64}}))
    assert _promote(store, "merged", "--to", "release") == 2
    assert "pins" in capsys.readouterr().err


def test_expect_is_compare_and_swap(gated, capsys):
    _, store, versions, policy = gated
    wrong = versions["adapter-a"].digest
    assert _promote(store, "merged", "--to", "release", "--policy", str(policy), "--expect", wrong) == 4
    assert _promote(store, "merged", "--to", "release", "--policy", str(policy), "--expect", "none") == 0
    # the alias exists now: "none" loses the race
    assert _promote(store, "merged", "--to", "release", "--policy", str(policy), "--expect", "none") == 4


def test_force_requires_reason_and_is_audited(setup, capsys):
    _, store, versions, policy = setup
    assert _promote(store, "noisy-merge", "--to", "release", "--force") == 2
    assert "--reason" in capsys.readouterr().err
    code = _promote(store, "noisy-merge", "--to", "release", "--force", "--reason", "hotfix INC-42",
                    "--json")
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["forced"] is True and out["reason"] == "hotfix INC-42"
    assert store.aliases("noisy-merge")["release"] == versions["noisy-merge"].digest
    moved = _audit(store, "promote-forced")[-1]
    assert moved["subject"] == "noisy-merge:release" and moved["new"] == versions["noisy-merge"].digest
    why = _audit(store, "promote-forced-reason")[-1]
    assert why["new"]["reason"] == "hotfix INC-42" and why["seq"] == moved["seq"] + 1
    assert store.audit().verify().ok


def test_release_alias_cannot_be_moved_around_the_gate(setup, capsys):
    _, store, versions, _ = setup
    code = main(["alias", "set", "merged:release", "merged", "--store", str(store.root)])
    assert code == 1
    assert "release" not in store.aliases("merged")


def test_history_answers_what_was_released_when(gated, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    w, store, versions, policy = gated
    assert _promote(store, "merged", "--to", "release", "--policy", str(policy)) == 0
    # a second version of the same name, released by force
    from tests.support.gate import push_adapter

    second = push_adapter(store, "merged", w.noisy_merge, w.base)
    assert _promote(store, second.ref, "--to", "release", "--force", "--reason", "rollback drill") == 0
    capsys.readouterr()
    assert main(["alias", "history", "merged:release", "--json", "--store", str(store.root)]) == 0
    rows = json.loads(capsys.readouterr().out)["history"]
    assert [r["action"] for r in rows] == ["promote", "promote-forced"]
    assert rows[0]["old"] is None and rows[0]["new"] == versions["merged"].digest
    assert rows[1]["old"] == versions["merged"].digest and rows[1]["new"] == second.digest
    assert rows[1]["reason"] == "rollback drill" and rows[0]["reason"] is None
    assert rows[0]["ts"] <= rows[1]["ts"]
    assert main(["alias", "history", "merged:release", "--store", str(store.root)]) == 0
    assert "rollback drill" in capsys.readouterr().out


def test_release_baseline_is_skipped_until_something_is_released(gated):
    """`baseline: release` compares with what the release alias points at, once there is one."""
    w, store, versions, policy = gated
    vs_release = policy.parent / "vs-release.yaml"
    vs_release.write_text(yaml.safe_dump({
        "version": 1, "release": "merged:release",
        "checks": [{"kind": "retention", "baseline": "release", "sets": {"task-a": f"data/{w.eval_a.name}"},
                    "min_ratio": 0.8}]}))
    before = run_gate("noisy-merge", w.base, vs_release, store=store, record=False)
    assert before.passed and before.checks[0].status == "skip"
    assert "does not exist yet" in before.checks[0].message
    assert _promote(store, "merged", "--to", "release", "--policy", str(policy)) == 0
    after = run_gate("noisy-merge", w.base, vs_release, store=store, record=False)
    check = after.checks[0]
    assert not after.passed and check.status == "fail"
    assert check.metrics["task-a.baseline"] == 1.0 and check.metrics["task-a.candidate"] == 0.0


def test_trusted_keys_require_a_signature(gated, tmp_path, capsys):
    from registry.signing import generate_key, sign_version

    _, store, versions, policy = gated
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    keyid = generate_key(private, public)
    args = ["merged", "--to", "release", "--policy", str(policy), "--trusted-keys", str(public)]
    assert _promote(store, *args) == 1  # gate passed, but unsigned
    assert "signature" in capsys.readouterr().err
    assert "release" not in store.aliases("merged")
    merged = versions["merged"]
    store.add_signature(merged, sign_version(merged.name, merged.digest, private))
    assert _promote(store, *args, "--json") == 0
    assert json.loads(capsys.readouterr().out)["signed_by"] == [keyid]
