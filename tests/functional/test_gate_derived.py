"""Gating derived models: unloaded and quantized versions, by ref or by directory.

The store holds the gate world's adapters and their exact linear merge
(tests/support/gate.py), the merge unloaded into the base (``merged-unloaded``,
recorded by reference) and that model quantized to nf4 (``merged-nf4``, lineage
source ``merged-unloaded``). ``merged-nf4-noisy`` is the nf4 checkpoint with its
absmax scales multiplied by random factors (exp(N(0, 1))), recorded with the same
lineage: deliberately over-quantized, still finite and well-formed.

Measured here (30 held-out positions, float32 on CPU): unloaded vs the merged
adapter on the base: mean KL 0, max |logit diff| 0 (bitwise equal logits); nf4 vs
the unloaded model: mean KL 0.60, top-1 0.50; the noisy nf4: mean KL 2.49. The
policy's ``max_kl: 1.2`` sits between them, a factor 2 from each. (For reference, int8: KL
0.0012, top-1 0.97.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cli.main import main
from tests.support.gate import build_store, world, write_policy

pytestmark = pytest.mark.filterwarnings("ignore")
MAX_KL = 1.2


def _record_copy(store, name: str, model_dir: Path, source, *, location: str | None = None):
    """Record ``model_dir`` by reference as a quantization of ``source``."""
    from registry.formats.fingerprint import fingerprint_model
    from registry.lineage import make_lineage, parent
    from registry.record import build_model_record

    record = build_model_record(fingerprint_model(model_dir), location=location or str(model_dir),
                                base_model="tiny-llama",
                                base_fingerprint=source.record["weights"])
    lineage = make_lineage([parent(source, role="source")], method="quantize")
    return store.record_derived(name, record, lineage).version


def _scale_absmax(model_dir: Path, how) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for key in sorted(tensors):
        if key.endswith(".absmax"):
            tensors[key] = how(key, tensors[key])
    path.chmod(0o644)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from merging.model.quantize import quantize
    from merging.model.unload import unload

    w = world()
    root = tmp_path_factory.mktemp("gate-derived")
    store, versions = build_store(root / "store", w)
    unload("merged", w.base, root / "merged-unloaded", store=store, name="merged-unloaded")
    quantize(root / "merged-unloaded", "nf4", out=root / "merged-nf4", store=store,
             name="merged-nf4")
    for name in ("merged-unloaded", "merged-nf4"):
        versions[name] = store.resolve(name)
    noisy = root / "merged-nf4-noisy"
    shutil.copytree(root / "merged-nf4", noisy)
    gen = torch.Generator().manual_seed(0)
    _scale_absmax(noisy, lambda _, t: t * torch.exp(torch.randn(t.shape, generator=gen)))
    versions["merged-nf4-noisy"] = _record_copy(store, "merged-nf4-noisy", noisy,
                                                versions["merged-unloaded"])
    policy = write_policy(
        root / "gate.yaml", w,
        drift={"kind": "drift", "data": f"data/{w.heldout.name}", "max_kl": MAX_KL},
        loglik={"kind": "retention", "name": "retention_loglik", "metric": "loglik",
                "min_ratio": 0.5, "sets": {"adapter-a": f"data/{w.eval_a.name}",
                                           "adapter-b": f"data/{w.eval_b.name}"}})
    return w, store, versions, policy, root


def _gate(setup, capsys, ref: str, *extra: str, policy: Path | None = None) -> tuple[int, dict]:
    w, store, _, default_policy, _ = setup
    capsys.readouterr()
    code = main(["gate", ref, "--base", str(w.base), "--policy", str(policy or default_policy),
                 "--store", str(store.root), "--json", *extra])
    captured = capsys.readouterr()
    try:
        return code, json.loads(captured.out)
    except ValueError:
        raise AssertionError(f"exit {code}: {captured.out}\n{captured.err}") from None


def _checks(out: dict) -> dict[str, dict]:
    return {c["name"]: c for c in out["checks"]}


def test_unloaded_merge_scores_like_the_merged_adapter(setup, capsys):
    _, store, versions, _, _ = setup
    code_a, adapter = _gate(setup, capsys, "merged")
    code_m, model = _gate(setup, capsys, "merged-unloaded")
    assert code_a == 0 and code_m == 0, (adapter, model)
    a, m = _checks(adapter), _checks(model)
    ppl = ("perplexity", "baseline_perplexity")
    for key in ppl:
        assert m["perplexity"]["metrics"][key] == pytest.approx(a["perplexity"]["metrics"][key],
                                                               rel=1e-4, abs=1e-4)
    for check in ("retention", "retention_loglik"):
        for key, value in a[check]["metrics"].items():
            if key.endswith((".candidate", ".baseline", ".ratio")):
                assert m[check]["metrics"][key] == pytest.approx(value, abs=1e-4), (check, key)
    assert m["merge_equivalence"]["status"] == "pass"  # the merge it came from, via the lineage
    assert m["structural"]["metrics"]["structure"] == "match"
    assert m["drift"]["status"] == "pass" and m["drift"]["metrics"]["mean_kl"] <= 1e-9
    assert m["drift"]["metrics"]["top1_agreement"] == 1.0
    assert a["drift"]["status"] == "skip" and "no source model" in a["drift"]["message"]
    digest = versions["merged-unloaded"].digest
    assert model["candidate_digest"] == digest and model["stored"] is True
    assert store.gate_record(digest, model["policy_digest"])["passed"] is True
    assert model["meta"]["provenance"]["chain"][1] == versions["merged"].ref


def test_quantized_model_is_scored_against_the_merge_parents(setup, capsys):
    _, store, versions, _, _ = setup
    code, out = _gate(setup, capsys, "merged-nf4")
    checks = _checks(out)
    assert code == 0, out
    prov = out["meta"]["provenance"]
    assert prov["chain"] == [versions[n].ref for n in ("merged-nf4", "merged-unloaded", "merged")]
    assert prov["parents"] == [versions["adapter-a"].ref, versions["adapter-b"].ref]
    rows = {r["set"]: r for r in checks["retention"]["details"]}
    assert rows["adapter-a"]["baseline"] == 1.0 and rows["adapter-b"]["baseline"] == 1.0
    assert checks["perplexity"]["message"].endswith("for parent adapter-a")
    assert checks["structural"]["metrics"]["quantized_weights"] == 14
    assert checks["merge_equivalence"]["status"] == "skip"
    drift = checks["drift"]["metrics"]
    assert drift["source"] == versions["merged-unloaded"].ref
    assert 0.05 < drift["mean_kl"] < MAX_KL / 1.5 and drift["top1_agreement"] < 1.0
    assert store.gate_record(versions["merged-nf4"].digest, out["policy_digest"]) is not None


def test_model_directory_is_matched_to_its_record(setup, capsys):
    _, _, versions, _, root = setup
    code, out = _gate(setup, capsys, str(root / "merged-nf4"))
    assert code == 0, out
    assert out["candidate"] == versions["merged-nf4"].ref and out["stored"] is True
    assert out["meta"]["provenance"]["matched_by"] == "weights digest"
    assert _checks(out)["retention"]["status"] == "pass"


def test_drift_matches_an_independent_reference(setup, capsys):
    """KL against torch's kl_div, top-1 against argmax, on logits computed here."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.unload import exact_cpu_4bit

    w, _, _, _, root = setup
    code, out = _gate(setup, capsys, "merged-nf4")
    got = _checks(out)["drift"]["metrics"]
    tok = AutoTokenizer.from_pretrained(w.base)
    source = AutoModelForCausalLM.from_pretrained(root / "merged-unloaded").eval()
    cand = exact_cpu_4bit(AutoModelForCausalLM.from_pretrained(root / "merged-nf4",
                                                              device_map="cpu").eval())
    kl, agree, positions, peak = 0.0, 0, 0, 0.0
    with torch.no_grad():
        for line in w.heldout.read_text().splitlines():
            ids = torch.tensor([tok(json.loads(line)["text"])["input_ids"]])
            p, q = source(ids).logits[0].double(), cand(ids).logits[0].double()
            kl += float(F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True,
                                 reduction="sum"))
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            positions += p.shape[0]
            peak = max(peak, float((p - q).abs().max()))
    assert got["positions"] == positions
    assert got["mean_kl"] == pytest.approx(kl / positions, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / positions, abs=1e-6)
    assert got["max_logit_diff"] == pytest.approx(peak, rel=1e-4)


def test_over_quantized_model_fails_drift(setup, capsys):
    _, store, versions, _, _ = setup
    code, out = _gate(setup, capsys, "merged-nf4-noisy")
    checks = _checks(out)
    assert code == 1 and out["passed"] is False
    assert checks["structural"]["status"] == "pass"  # finite and well-formed: only behaviour is off
    assert checks["drift"]["status"] == "fail"
    assert f"> max_kl {MAX_KL}" in checks["drift"]["message"]
    assert checks["drift"]["metrics"]["mean_kl"] > 1.5 * MAX_KL
    record = store.gate_record(versions["merged-nf4-noisy"].digest, out["policy_digest"])
    assert record is not None and record["passed"] is False
    # and promote refuses it, naming the drift check (exit 1, alias untouched)
    policy = setup[3]
    code = main(["promote", "merged-nf4-noisy", "--to", "release", "--policy", str(policy),
                 "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 1 and "drift" in err and "failed the gate" in err
    assert "release" not in store.aliases("merged-nf4-noisy")


def _structural_only(root: Path) -> Path:
    path = root / "structural.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "checks": [{"kind": "structural"}]}))
    return path


@pytest.mark.parametrize("damage, expected", [
    ("nan", "q_proj.weight.absmax holds NaN/inf"),
    ("state", "malformed quant state (blocksize 100)"),
    ("short", "absmax has 143 values, 144 expected"),
    ("extra", "unexpected tensor model.layers.0.self_attn.q_proj.lora_A.weight"),
])
def test_broken_quantization_state_fails_structural(setup, capsys, tmp_path, damage, expected):
    from safetensors.torch import load_file, save_file

    _, _, _, _, root = setup
    broken = tmp_path / "broken"
    shutil.copytree(root / "merged-nf4", broken)
    path = broken / "model.safetensors"
    tensors = load_file(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    if damage == "nan":
        tensors[f"{q}.absmax"][3] = float("nan")
    elif damage == "state":
        state = {"quant_type": "nf4", "blocksize": 100, "dtype": "float32", "shape": [96, 96]}
        tensors[f"{q}.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(state).encode()), dtype=torch.uint8)
    elif damage == "short":
        tensors[f"{q}.absmax"] = tensors[f"{q}.absmax"][:-1].clone()
    else:
        tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 96)
    path.chmod(0o644)
    save_file(tensors, str(path), metadata={"format": "pt"})
    code, out = _gate(setup, capsys, str(broken), policy=_structural_only(tmp_path))
    assert code == 1 and out["stored"] is False  # no record has these weights
    assert expected in out["checks"][0]["message"], out["checks"][0]["message"]


def test_tampered_model_dir_exits_3_and_evaluates_nothing(setup, capsys, tmp_path, monkeypatch):
    import gate.evaluate

    _, store, versions, policy, root = setup
    copy = tmp_path / "deployed"
    shutil.copytree(root / "merged-unloaded", copy)
    path = copy / "model.safetensors"
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    loads = []
    monkeypatch.setattr(gate.evaluate.Evaluator, "__init__",
                        lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    gates_before = len([e for e in store.audit().entries() if e["action"] == "gate"])
    code = main(["gate", "merged-unloaded", "--model", str(copy), "--base", str(setup[0].base),
                 "--policy", str(policy), "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 3 and not loads
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "nothing was evaluated" in lines[0]
    assert "weights digest" in lines[0] and lines[1].startswith("fix: ")
    assert len([e for e in store.audit().entries() if e["action"] == "gate"]) == gates_before


@pytest.fixture(scope="module")
def lost(setup):
    """``lost-nf4``: the nf4 model whose recorded source (``lost-unloaded``) has no location."""
    _, store, versions, _, root = setup
    unloaded = versions["merged-unloaded"]
    from registry.lineage import make_lineage, parent
    from registry.record import build_model_record

    record = build_model_record(unloaded.record["weights"], location=str(root / "gone"),
                                base_model="tiny-llama",
                                base_fingerprint=unloaded.record["base_model"]["fingerprint"])
    source = store.record_derived("lost-unloaded", record, make_lineage(
        [parent(versions["merged"], role="adapter")], method="unload")).version
    # its own copy of the nf4 directory: sharing merged-nf4's location would make the
    # newest record (this one) win the match of that directory in other tests
    copy = root / "lost-nf4"
    if not copy.exists():
        shutil.copytree(root / "merged-nf4", copy)
    return _record_copy(store, "lost-nf4", copy, source, location=str(copy))


def test_drift_source_given_with_source_option(setup, lost, capsys, tmp_path):
    _, _, _, _, root = setup
    w = setup[0]
    policy = write_policy(tmp_path / "drift.yaml", w, structural=None, merge_equivalence=None,
                          perplexity=None, retention=None, generation=None,
                          drift={"kind": "drift", "data": f"data/{w.heldout.name}",
                                 "max_kl": MAX_KL, "min_top1": 0.3})
    code, err = _gate(setup, capsys, "lost-nf4", policy=policy)
    assert code == 2 and err["error"] == "BadInputError"
    assert "drift needs the source" in err["message"] and "--source DIR" in err["fix"]
    code, out = _gate(setup, capsys, "lost-nf4", "--source", str(root / "merged-unloaded"),
                      policy=policy)
    assert code == 0 and out["checks"][0]["status"] == "pass", out
    bad = tmp_path / "bad-source"
    shutil.copytree(root / "merged-nf4-noisy", bad)  # some other model
    code, err = _gate(setup, capsys, "lost-nf4", "--source", str(bad), policy=policy)
    assert code == 3 and err["error"] == "IntegrityError" and "lost-unloaded@" in err["message"]


@pytest.mark.parametrize("args, code, words", [
    (["lost-unloaded"], 5, "does not exist"),
    (["merged", "--model", "{root}/merged-unloaded"], 2, "--model is for models recorded"),
    (["merged-unloaded", "--source", "{root}/merged-unloaded"], 2, "--source names a quantization"),
    (["{root}/merged-unloaded", "--model", "{root}/merged-unloaded"], 2, "--model goes with a registry ref"),
    (["merged-unloaded", "--model", "{root}/nowhere"], 5, "does not exist"),
])
def test_refusals_name_the_problem(setup, lost, capsys, args, code, words):
    root = setup[4]
    got, err = _gate(setup, capsys, *[a.format(root=root) for a in args])
    assert got == code and words in err["message"], err
    assert err["fix"]


def test_drift_policy_needs_a_threshold(setup, capsys, tmp_path):
    w = setup[0]
    policy = write_policy(tmp_path / "p.yaml", w, drift={"kind": "drift", "data": "data/heldout.jsonl"})
    code, err = _gate(setup, capsys, "merged", policy=policy)
    assert code == 2 and "max_kl" in err["message"] and "min_top1" in err["message"]
