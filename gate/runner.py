"""Run a gate: every policy check against one candidate, then record the verdict.

:func:`run_gate` resolves the candidate (any registry ref -- adapter, merge, unloaded or
quantized model -- with its lineage, or a directory; see :mod:`gate.context`). Before
any model is loaded, a derived model recorded by reference has its directory checked
against its record, and, when the policy has a ``drift`` check, so has its source
(IntegrityError, exit 3: nothing is evaluated or recorded). It then runs the
checks in policy order with one shared :class:`gate.evaluate.Evaluator` (models are
loaded once and reused across checks), and returns a frozen
:class:`gate.results.GateResult`. A check that raises becomes an ``error`` result
(the gate fails, the other checks still run), so a broken candidate produces a
complete report rather than a traceback.

For a registry candidate the result is stored with
``Store.put_gate_record(candidate digest, policy digest, result)`` (audited as
``gate``); the policy's canonical bytes are stored as a blob too, so the policy
digest in the record resolves to the exact policy that was applied.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.checks import get_check
from gate.context import (Candidate, GateContext, Parent, candidate_from_dir,
                          candidate_from_store)
from gate.source_check import check_source
from gate.results import CheckResult, GateResult
from registry import __version__
from registry.stamps import utc_now_iso
from registry.errors import AdapterkitError, BadInputError, NotFoundError, out_of_memory_error, shorten
from registry.fsutil import leased_temp_dir

if TYPE_CHECKING:
    from gate.policy import Policy
    from registry.storage.store import Store

__all__ = ["CheckResult", "GateResult", "run_gate"]


def _versions() -> dict[str, str]:
    out = {"adapterkit": __version__, "python": platform.python_version()}
    for module in ("torch", "transformers", "peft"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not listed
            pass
    return out


def _run_check(spec: Any, ctx: GateContext) -> CheckResult:
    start = time.perf_counter()
    try:
        outcome = get_check(spec.kind)(spec, ctx)
        status, message, metrics, details = (outcome.status, outcome.message,
                                             outcome.metrics, outcome.details)
    except AdapterkitError as err:
        status, message, metrics, details = "error", err.message, {}, None
    except Exception as err:  # noqa: BLE001 - a broken candidate must not crash the gate
        memory = out_of_memory_error(err)
        if memory is not None:  # the machine's, not the candidate's: exit 6, nothing recorded
            raise memory from err
        status, message, metrics, details = "error", f"{type(err).__name__}: {err}", {}, None
    return CheckResult(name=spec.name, kind=spec.kind, status=status, message=message,
                       metrics=metrics, details=details,
                       duration_s=time.perf_counter() - start)


def _workspace(store: Store | None, record: bool) -> Any:
    """Where the gate materializes inputs: the store's ``tmp/`` (gc leaves a leased one
    alone, and blobs can be linked there), else a system temp directory.

    A ``--no-record`` gate only reads the store, so on a store it may not write (a
    read-only mount, an auditor's copy) it works in the system's temp directory instead of
    failing with exit 6; a recording gate needs the store writable anyway.
    """
    if store is None:
        return tempfile.TemporaryDirectory(prefix="gate-")
    tmp = store.root / "tmp"
    if record or os.access(tmp if tmp.exists() else store.root, os.W_OK):
        return leased_temp_dir(tmp, "gate-")  # gc skips it
    return tempfile.TemporaryDirectory(prefix="gate-")


def _base_fingerprint(base_dir: Path) -> str:
    """The base's ``struct_digest``, read before anything is evaluated.

    Raises:
        BadInputError: ``base_dir`` is not a model directory (no ``config.json`` or no
            readable safetensors weights): a typo in ``--base`` must not store a failing
            record over a passing one.
    """
    from registry.formats.fingerprint import fingerprint_model

    fix = "pass --base with a local transformers model directory (config.json + safetensors)"
    if not (base_dir / "config.json").is_file():
        raise BadInputError(f"base model directory {base_dir} has no config.json", fix=fix)
    try:
        return fingerprint_model(base_dir, weights=False).struct_digest
    except AdapterkitError as err:
        raise BadInputError(f"base model directory {base_dir}: {err.message}", fix=fix) from None


def _resolve(candidate: str | Path | Candidate, store: Store | None, workdir: Path, *,
             parents: Sequence[Parent], method: str | None, parameters: dict | None,
             model_dir: str | Path | None, source_dir: str | Path | None) -> Candidate:
    """The :class:`Candidate` for what :func:`run_gate` was given."""
    model = Path(model_dir).expanduser() if model_dir is not None else None
    source = Path(source_dir).expanduser() if source_dir is not None else None
    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, Path) or (store is None and Path(str(candidate)).is_dir()):
        if model is not None:
            raise BadInputError("--model goes with a registry ref (the directory is the candidate)",
                                fix="gate the directory alone, or REF --model DIR")
        return candidate_from_dir(Path(candidate), parents=parents, method=method,
                                  parameters=parameters, store=store, workdir=workdir,
                                  source_dir=source)
    if store is None:
        raise BadInputError(f"{candidate!r} is a registry ref but no store was given",
                            fix="pass --store, or a PEFT directory")
    return candidate_from_store(store, str(candidate), workdir, model_dir=model, source_dir=source)


def _evaluate(pol: Policy, base: Path, cand: Candidate, *, store: Store | None, workdir: Path,
              device: str, on_check: Callable[[CheckResult], None] | None) -> list[CheckResult]:
    """Run the policy's checks in order with one shared evaluator (source checked first
    when a drift check needs it)."""
    from gate.evaluate import Evaluator

    if any(spec.kind == "drift" for spec in pol.checks):
        checked = check_source(store, cand)
        if checked:
            cand.provenance["source_check"] = checked
    evaluator = Evaluator(base, dtype=pol.dtype, seed=pol.seed, max_length=pol.max_length,
                          device=device)
    ctx = GateContext(policy=pol, base_dir=base, candidate=cand, evaluator=evaluator,
                      store=store, workdir=workdir)
    results = []
    for spec in pol.checks:
        result = _run_check(spec, ctx)
        results.append(result)
        if on_check is not None:
            on_check(result)
    return results


def run_gate(candidate: str | Path | Candidate, base_dir: str | Path, policy: Policy | str | Path, *,
             store: Store | None = None, parents: Sequence[Parent] = (), method: str | None = None,
             parameters: dict | None = None, record: bool = True, actor: str | None = None,
             device: str = "cpu", on_check: Callable[[CheckResult], None] | None = None,
             model_dir: str | Path | None = None, source_dir: str | Path | None = None
             ) -> GateResult:
    """Evaluate ``candidate`` on ``base_dir`` against ``policy``.

    Args:
        candidate: A registry ref (needs ``store``), a PEFT directory, or a Candidate.
        base_dir: The base model directory (safetensors weights + tokenizer).
        policy: A validated :class:`gate.policy.Policy` or the path of a YAML policy.
        store: The registry holding the candidate, its parents and the release alias.
        parents: For a directory candidate: its parents (name, dir, merge weight).
        method: For a directory candidate: its merge method (e.g. ``linear``).
        parameters: For a directory candidate: its merge parameters.
        record: Store the result as a gate record (registry candidates only).
        actor: Who ran the gate (audit log).
        device: Torch device for evaluation (``cpu`` by default).
        on_check: Called with each check's result as soon as it is known.
        model_dir: For a model recorded by reference: its directory (default: the
            record's ``location``); checked against the record first.
        source_dir: The source model's directory (drift), when its record's
            ``location`` is not at hand or the candidate is a directory.

    Returns:
        The frozen :class:`GateResult`; ``passed`` is False if any check failed or errored.

    Raises:
        BadInputError: Bad policy, a base directory that is not a model, a ref without a store,
            ``--model`` with a version that has stored files or a directory candidate,
            or a drift check whose source model is not at hand.
        NotFoundError: A missing base directory, an unknown ref, a lineage parent missing from the store, or a
            missing model directory.
        IntegrityError: A stored blob is corrupt, or the model (or source) directory
            does not hold the weights its record names.
    """
    from gate.policy import Policy as PolicyType
    from gate.policy import load_policy

    pol = policy if isinstance(policy, PolicyType) else load_policy(policy)
    base = Path(base_dir).expanduser()
    if base.exists() and not base.is_dir():
        raise BadInputError(f"--base {shorten(str(base))} is a file, not a model directory",
                            fix="pass --base with a local transformers model directory")
    if not base.is_dir():
        raise NotFoundError(f"base model directory {base} not found",
                            fix="pass --base with a local transformers model directory")
    base_struct = _base_fingerprint(base)
    started, clock = utc_now_iso(), time.perf_counter()
    workspace = _workspace(store, record)
    with workspace as work:
        cand = _resolve(candidate, store, Path(work), parents=parents, method=method,
                        parameters=parameters, model_dir=model_dir, source_dir=source_dir)
        results = _evaluate(pol, base, cand, store=store, workdir=Path(work), device=device,
                            on_check=on_check)
    meta = {"started": started, "duration_s": round(time.perf_counter() - clock, 3),
            "seed": pol.seed, "dtype": pol.dtype, "device": device, "policy_source": pol.source,
            "actor": actor, "versions": _versions(), "provenance": cand.provenance}
    result = GateResult(candidate=cand.label, candidate_digest=cand.digest,
                        policy_digest=pol.digest, passed=all(r.passed for r in results),
                        checks=tuple(results), base=str(base),
                        base_fingerprint=base_struct, meta=meta)
    if record and store is not None and cand.stored:
        result = replace(result, stored=True)
        store.put_bytes(pol.canonical_bytes())
        store.put_gate_record(cand.digest, pol.digest, result.to_json(), actor=actor)
    return result
