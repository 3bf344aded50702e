"""Gate records as evidence: when a stored record lets a version through.

A record counts only when it is the content-addressed blob ``gates/<digest>/<policy>``
names, names that very candidate and policy inside it, is the record the newest
effective ``gate`` audit entry names, and says ``passed: true``. Both
:mod:`gate.promote` (the version itself) and :mod:`gate.custody` (each link of its
lineage) apply this one rule, so it lives below both of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.errors import GateFailedError

if TYPE_CHECKING:
    from registry.storage.store import Store


def failed_summary(record: dict[str, Any]) -> str:
    """``"retention (fail: ...); structural (error: ...)"`` from a stored gate record."""
    bad = [c for c in record.get("checks") or [] if c.get("status") in ("fail", "error")]
    return "; ".join(f"{c.get('name')} ({c.get('status')}: {c.get('message')})" for c in bad) \
        or "the record says passed is not true"


def require_passing_gate(store: Store, digest: str, ref: str, policy_digest: str) -> dict[str, Any]:
    """The passing gate record of ``digest`` under ``policy_digest``, bound and vouched for.

    The record must (a) be the content-addressed blob that ``gates/<digest>/<policy>``
    names, (b) name this very candidate and policy inside it (a record copied from
    another version does not), and (c) be the record that the newest effective ``gate``
    audit entry for (candidate, policy) names (one slipped in beside the log does not).

    Raises:
        GateFailedError: No record, a record bound to another version or policy or not
            vouched for by the audit log, or a record that did not pass.
        IntegrityError: The record blob is corrupt, or the audit log is unreadable.
    """
    record = store.gate_record(digest, policy_digest)
    short = policy_digest.split(":")[-1][:12]
    if record is not None:
        _check_binding(store, record, digest, ref, policy_digest)
    if record is None:
        others = [p for c, p, _ in _gate_pointers(store) if c == digest]
        hint = (f" (it has records under other policies: "
                f"{', '.join(p.split(':')[-1][:12] for p in others)})") if others else ""
        raise GateFailedError(f"no gate record for {ref} under policy {short}{hint}",
                              fix=f"run `adapters gate {ref} --base MODEL_DIR --policy gate.yaml` first")
    if record.get("passed") is not True:
        raise GateFailedError(f"{ref} failed the gate under policy {short}: {failed_summary(record)}",
                              fix="fix the candidate and gate it again, or --force --reason TEXT")
    return record


def _check_binding(store: Store, record: dict[str, Any], digest: str, ref: str, policy_digest: str) -> None:
    """Raise unless ``record`` is bound to (digest, policy) and vouched for by the log."""
    from registry.audit.index import AuditIndex, gate_record_problem

    fix = f"gate it: `adapters gate {ref} --base MODEL_DIR --policy gate.yaml`"
    pointer = store.read_pointer(store.gate_key(digest, policy_digest))
    problem = gate_record_problem(AuditIndex.build(store), digest, policy_digest, record, pointer)
    if problem == "copied":
        raise GateFailedError(f"the gate record stored for {ref} was made for "
                              f"{str(record.get('candidate_digest'))[:19]}.. under policy "
                              f"{str(record.get('policy_digest'))[:19]}.., not for this version "
                              "and policy (copied?)", fix=fix)
    if problem is not None:
        raise GateFailedError(f"no audit entry vouches for the gate record of {ref} "
                              "(written outside adapterkit?)",
                              fix=f"run `adapters verify --all`; then {fix}")


def _gate_pointers(store: Store) -> list[tuple[str, str, str]]:
    try:
        return list(store.gate_pointers())
    except Exception:  # noqa: BLE001 - only used for a hint in an error message
        return []
