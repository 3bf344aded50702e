"""A small, realistic store for the web view's tests (route tests and browser tests).

:func:`build_ui_store` writes, in a few seconds on a CPU:

* ``lora-a`` and ``lora-b``: synthetic PEFT adapters (:mod:`tests.support.cli`) pushed
  with the CLI, with labels, metrics and a known risk;
* ``ab-ties``: their TIES merge, made by ``adapters merge`` (real merge engine, so the
  lineage carries the recipe and the per-module error report), aliased ``candidate``;
* a gate record for the merge, stored through :meth:`Store.put_gate_record` with a
  result built from :class:`gate.results.GateResult` (running the real gate needs a
  trained model: minutes), then ``promote`` to ``release`` (so ``release`` has a history);
* ``ab-ties-unloaded``: a merged full model recorded by reference with the lineage an
  ``adapters unload`` writes (method ``unload``, parent role ``adapter``);
* ``hostile``: an adapter whose labels, base-model name and known risks hold HTML and
  attribute-injection payloads (``<script>``, ``" onmouseover=``) that would set
  ``window.__pwned`` if any of them ever ran;
* an ed25519 signature on ``lora-a`` (the public key is returned, for ``--trusted-keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.cli import write_synthetic_adapter

XSS_SCRIPT = "<script>window.__pwned = 1</script>"
XSS_ATTR = '" onmouseover="window.__pwned = 2" autofocus onfocus="window.__pwned = 3" x="'
XSS_IMG = "<img src=x onerror=\"window.__pwned = 4\">"
XSS_BASE = f"{XSS_IMG}{XSS_ATTR}"
XSS_KEY = '"><script>alert(document.domain)</script>'
PAYLOADS = (XSS_SCRIPT, XSS_ATTR, XSS_IMG, XSS_KEY)


@dataclass(frozen=True)
class UiWorld:
    """What :func:`build_ui_store` made."""

    store: Path
    a: str
    b: str
    merge: str
    unloaded: str
    hostile: str
    policy: str
    gate_result: dict[str, Any]
    public_key: Path


def gate_result(candidate: str, digest: str, policy: str) -> dict[str, Any]:
    """A passing gate result for ``candidate``, as ``adapters gate --json`` prints it."""
    from gate.results import CheckResult, GateResult

    checks = (
        CheckResult("structural", "structural", "pass", "rank 8 <= 16, no NaN/Inf",
                    {"max_rank": 16, "rank": 8, "nonfinite": 0}, None, 0.012),
        CheckResult("perplexity", "perplexity", "pass", "perplexity +3.1% vs parents (max +25%)",
                    {"perplexity": 41.27, "baseline": 40.03, "increase": 0.031,
                     "max_increase": 0.25}, None, 1.5),
        CheckResult("retention", "retention", "pass", "kept 83% of lora-b (min 80%)",
                    {"lora-a": 1.0, "lora-b": 0.8333333333333334, "min_ratio": 0.8},
                    {"lora-a": {"score": 1.0}, "lora-b": {"score": 0.8333333333333334}}, 2.25),
        CheckResult("merge_equivalence", "merge_equivalence", "skip",
                    "not an exact merge (ties)", {}, None, 0.0),
    )
    result = GateResult(candidate=candidate, candidate_digest=digest, policy_digest=policy,
                        passed=True, checks=checks, base="/models/tiny-llama",
                        base_fingerprint=None, stored=True,
                        meta={"started": "2026-01-02T03:04:05Z", "duration_s": 3.8, "seed": 0,
                              "dtype": "float32", "device": "cpu", "policy_source": "gate.yaml",
                              "actor": "ci", "versions": {"adapterkit": "0.1.0"}})
    return result.to_json()


def _push(main: Any, store: Path, adapter: Path, name: str, *extra: str) -> str:
    code = main(["push", str(adapter), "--name", name, "--store", str(store), *extra])
    assert code == 0, f"push {name} exited {code}"
    from registry.storage.store import Store

    return Store.open(store).resolve(name).ref


def build_ui_store(root: Path) -> UiWorld:
    """Build the store under ``root / "store"`` (see the module docstring)."""
    from cli.main import main
    from gate.promote import promote
    from registry.digests import canonical_json
    from registry.lineage import make_lineage, parent
    from registry.record import build_model_record
    from registry.signing import generate_key, sign_version
    from registry.storage.store import Store

    store = root / "store"
    assert main(["init", str(store)]) == 0
    a = _push(main, store, write_synthetic_adapter(root / "a", seed=1), "lora-a",
              "--label", "team=search", "--metric", "accuracy=0.91", "--risk",
              "may answer in French", "--base-model", "tiny-llama", "--license", "apache-2.0")
    b = _push(main, store, write_synthetic_adapter(root / "b", seed=2), "lora-b",
              "--label", "team=ads", "--metric", "accuracy=0.87", "--base-model", "tiny-llama")
    code = main(["merge", a, b, "--method", "ties", "--weights", "0.6,0.4", "--density", "0.5",
                 "--name", "ab-ties", "--store", str(store)])
    assert code == 0, f"merge exited {code}"
    st = Store.open(store)
    merged = st.resolve("ab-ties")
    st.set_alias("ab-ties", "candidate", merged.digest)
    policy = st.put_bytes(canonical_json({"policy": {"version": 1, "seed": 0, "checks": []},
                                          "data": {}}))  # the shape Policy.canonical_bytes has
    result = gate_result(merged.ref, merged.digest, policy)
    st.put_gate_record(merged.digest, policy, result, actor="ci")
    promote(st, merged.ref, "release", policy_digest=policy)
    weights = {"struct_digest": "sha256:" + "1" * 64, "weights_digest": "sha256:" + "2" * 64}
    record = build_model_record(weights, location="/models/ab-ties-merged",
                                base_model="tiny-llama", labels={"stage": "unloaded"})
    lineage = make_lineage([parent(merged, role="adapter")], method="unload",
                           parameters={"quantization": None, "files": ["model.safetensors"]},
                           report={"tensors": 17, "notes": ["synthetic unload for the UI test"]})
    unloaded = st.record_derived("ab-ties-unloaded", record, lineage).version.ref
    hostile = _push(main, store, write_synthetic_adapter(root / "h", seed=3), "hostile",
                    "--label", f"xss={XSS_SCRIPT}", "--label", f"attr={XSS_ATTR}",
                    "--label", f"{XSS_KEY}=key payload",
                    "--risk", XSS_SCRIPT + XSS_IMG, "--base-model", XSS_BASE)
    key, pub = root / "keys" / "ui.pem", root / "keys" / "ui.pub"
    key.parent.mkdir()
    generate_key(key, pub)
    version = st.resolve(a)
    st.add_signature(version, sign_version(version.name, version.digest, key))
    return UiWorld(store, a, b, merged.ref, unloaded, hostile, policy, result, pub)
