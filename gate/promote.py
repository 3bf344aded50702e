"""Promotion: move a protected alias (``release``) only for a version that passed the gate.

Rules (:func:`promote`):

1. The policy is the store's pinned policy, ``config.json`` key ``gate_policy``: either
   a path (absolute, or relative to the store directory) or
   ``{"path": ..., "digest": "sha256:.."}`` / ``{"digest": "sha256:.."}``. With both
   a path and a digest, the file must still hash to the pinned digest, so an edited
   policy (or eval set) cannot quietly relax the gate. When the store pins a policy,
   it is the only one accepted: ``--policy other.yaml`` with another digest is refused
   (exit 1) unless forced. A store with no pin takes ``--policy``.
2. Without ``force``: a gate record must exist for *exactly* this version digest
   under that policy digest, be bound to them (its own ``candidate_digest`` and
   ``policy_digest``), be the record the newest effective ``gate`` audit entry names
   (:func:`registry.audit.index.gate_record_problem`), and say ``passed: true``. Otherwise
   :class:`~registry.errors.GateFailedError` (exit 1) names what is missing, or which
   checks failed and why.
3. ``expect`` makes the move a compare-and-swap (``ConflictError``, exit 4, when the
   alias moved in the meantime; ``None`` means "must not exist yet").
4. The store moves the alias with ``protected_ok=True`` and audits it as
   ``promote`` (old and new digest).
5. ``force`` skips rule 2 but requires a non-empty ``reason``; the move is audited
   as ``promote-forced``, followed by a ``promote-forced-reason`` entry for the same
   ``NAME:ALIAS`` carrying ``{"digest", "reason", "policy", "gate_passed"}`` (the
   store's alias entry has no room for free text); both are logged before the alias
   moves (:mod:`registry.audit.journal`).
6. Signatures: with trusted keys (``--trusted-keys PATH``, else the store's
   ``config.json`` ``trusted_keys`` list, paths relative to the store directory) the
   version must also carry a valid signature by one of them
   (:func:`registry.signing.require_signature`, exit 1 otherwise). ``force`` does not
   waive this: it overrides the gate, not provenance.
7. Any version kind is promoted the same way (adapter, merge, unloaded or quantized
   model): the record must be for that exact digest. With ``require_source_gate:
   true`` in the policy, every version on the lineage path back to the adapters needs
   a passing record under the same policy too (:mod:`gate.custody`; exit 1 naming the
   ungated link). ``force`` skips this with the gate.
8. A record made under adapterkit's built-in default policy is accepted only when the
   store pins that policy's digest (:func:`gate.default_policy.refuse_unpinned_default`,
   exit 1 otherwise, also with ``--policy`` naming a copy of it). ``force`` skips this.

Where the rules' inputs come from is :mod:`gate.store_config` (the pinned policy,
the trusted keys) and what a passing record is, :mod:`gate.records` (shared with
:mod:`gate.custody`), so this module only composes them and neither imports it back.
:func:`promote_configured` is the ``adapters promote`` use case: the same rules with
the policy and keys taken from the options or the store's configuration.

:func:`alias_history` reads the audit log back: every move of ``NAME:ALIAS``, oldest
first, with the reason attached to forced promotions ("what was released when").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.custody import require_custody, requires_source_gate
from gate.default_policy import refuse_unpinned_default
from gate.records import require_passing_gate
from gate.store_config import (configured_policy, configured_trusted_keys, pinned_policy,
                               pinned_policy_file)
from registry.errors import BadInputError, ConflictError, GateFailedError
from registry.storage.store import ANY

if TYPE_CHECKING:
    from registry.storage.store import Store

REASON_ACTION = "promote-forced-reason"


@dataclass(frozen=True)
class PromoteResult:
    """What a promotion did."""

    name: str
    alias: str
    digest: str
    ref: str
    old: str | None
    forced: bool
    reason: str | None
    policy_digest: str | None
    gate_passed: bool | None
    signed_by: tuple[str, ...] = ()
    custody: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "signed_by": list(self.signed_by), "custody": list(self.custody)}


def _require_pinned(store: Store, policy_digest: str | None, force: bool) -> None:
    """Refuse a policy other than the store's pinned one unless forced (rule 1)."""
    try:
        pinned = pinned_policy(store)
    except BadInputError:
        if force:
            return  # a broken pin cannot block a forced (audited) promotion
        raise
    if pinned is None or policy_digest == pinned[0]:
        return
    if not force:
        given = (policy_digest or "none").split(":")[-1][:12]
        raise GateFailedError(f"policy {given} is not the policy this store pins "
                              f"({pinned[0].split(':')[-1][:12]}, {pinned[1]})",
                              fix="promote under the pinned policy (drop --policy), or "
                                  "--force --reason TEXT (audited as forced)")


def require_reason(force: bool, reason: str | None) -> None:
    """A forced promotion must say why (rule 5); checked before any other work.

    Raises:
        BadInputError: ``force`` without a non-empty ``reason``.
    """
    if force and not (reason and reason.strip()):
        raise BadInputError("--force requires --reason", fix="say why: --force --reason 'hotfix for ...'")


def promote(store: Store, ref: str, alias: str = "release", *, policy_digest: str | None = None,
            expect: Any = ANY, force: bool = False, reason: str | None = None,
            trusted_keys: Sequence[Path] = (), actor: str | None = None,
            policy_file: str | Path | None = None) -> PromoteResult:
    """Point ``NAME:alias`` at the version ``ref`` names, if its gate record allows.

    Args:
        store: The registry.
        ref: The version to promote (any ref: ``name@sha256:..``, ``name:candidate``...).
        alias: The alias to move (normally the protected ``release``).
        policy_digest: The policy the gate record must be under (see
            :func:`configured_policy`); required unless ``force``.
        expect: Compare-and-swap: the digest (or unique prefix) the alias must point to
            now; None: it must not exist yet; ``ANY`` (default): no check.
        force: Skip the gate-record requirement (needs ``reason``; audited).
        reason: Why a forced promotion was necessary.
        trusted_keys: If any, also require a valid signature by one of these keys.
        actor: Who promotes (audit log).
        policy_file: The policy file (``--policy``), to read the policy's content
            from when the store has no copy (default: the pinned path, if any).

    Returns:
        The :class:`PromoteResult`.

    Raises:
        GateFailedError: No passing gate record (and not forced), an ungated link of
            the chain of custody (``require_source_gate``), a record under the
            unpinned built-in default policy, or no valid trusted signature when
            ``trusted_keys`` are given.
        BadInputError: ``force`` without a reason, or no policy digest.
        ConflictError: The alias does not point to ``expect``.
        NotFoundError: Unknown ref.
    """
    require_reason(force, reason)
    if not force and not policy_digest:
        raise BadInputError("promotion needs the gate policy digest",
                            fix="pass --policy gate.yaml or configure gate_policy")
    _require_pinned(store, policy_digest, force)
    version = store.resolve(ref)
    record = None
    custody: tuple[str, ...] = ()
    # the record pointer as it was before the check: the move below repeats the comparison
    # under the refs lock (gate records change under it too), so a gate re-run in between
    # is a conflict, not a promotion on a record that is no longer the stored one
    gate_key = store.gate_key(version.digest, policy_digest) if policy_digest and not force else None
    checked = store.read_pointer(gate_key) if gate_key else None
    if not force:
        refuse_unpinned_default(store, policy_digest)
        record = require_passing_gate(store, version.digest, version.ref, policy_digest)  # type: ignore[arg-type]
        if requires_source_gate(store, policy_digest, pinned_policy_file(store, policy_file)):  # type: ignore[arg-type]
            custody = tuple(require_custody(store, version, policy_digest))  # type: ignore[arg-type]
    elif policy_digest:
        record = store.gate_record(version.digest, policy_digest)
    signed_by: tuple[str, ...] = ()
    if trusted_keys:
        from registry.signing import require_signature

        signed_by = tuple(require_signature(store, version, trusted_keys).valid_keyids)
    action = "promote-forced" if force else "promote"
    gate_passed = None if record is None else record.get("passed") is True
    notes = [(REASON_ACTION, {"digest": version.digest, "reason": (reason or "").strip(),
                              "policy": policy_digest, "gate_passed": gate_passed})] if force else []

    def still_valid() -> None:
        if gate_key is not None and store.read_pointer(gate_key) != checked:
            raise ConflictError(f"the gate record of {version.ref} changed while promoting "
                                "(a gate ran meanwhile)", fix="run promote again")

    old = store.set_alias(version.name, alias, version.digest,
                          expect=expect, actor=actor, action=action,
                          protected_ok=True, notes=notes, still_valid=still_valid)
    return PromoteResult(name=version.name, alias=alias, digest=version.digest, ref=version.ref,
                         old=old, forced=force, reason=reason.strip() if force and reason else None,
                         policy_digest=policy_digest, gate_passed=gate_passed, signed_by=signed_by,
                         custody=custody)


@dataclass(frozen=True)
class ConfiguredPromotion:
    """What ``adapters promote`` did: the promotion and where its policy came from."""

    result: PromoteResult
    policy_source: str | None

    def to_json(self) -> dict[str, Any]:
        """The ``promote --json`` document."""
        return {**self.result.to_json(), "policy_source": self.policy_source}


def promote_configured(store: Store, ref: str, alias: str = "release", *,
                       policy_file: str | Path | None = None, expect: object = ANY,
                       force: bool = False, reason: str | None = None,
                       trusted_key_paths: Sequence[Path] = ()) -> ConfiguredPromotion:
    """:func:`promote` with the policy and trusted keys given, else the store's configuration.

    The policy digest is ``policy_file``'s, else the store's pinned one
    (:func:`gate.store_config.configured_policy`); a forced promotion without
    ``policy_file`` goes ahead when none can be found (it is audited as forced and
    names no policy). The trusted keys are ``trusted_key_paths``, else config.json's.

    Raises:
        BadInputError: ``force`` without a non-empty ``reason``; no policy (not forced),
            or an invalid given or configured policy or key setting.
        GateFailedError / ConflictError / NotFoundError: As :func:`promote`.
    """
    require_reason(force, reason)
    try:
        policy_digest, source = configured_policy(store, policy_file)
    except BadInputError:
        if not force or policy_file is not None:
            raise
        policy_digest, source = None, None
    keys = configured_trusted_keys(store, trusted_key_paths)
    result = promote(store, ref, alias, policy_digest=policy_digest, expect=expect, force=force,
                     reason=reason, trusted_keys=keys, policy_file=policy_file)
    return ConfiguredPromotion(result=result, policy_source=source)


def alias_history(store: Store, name: str, alias: str) -> list[dict[str, Any]]:
    """Every move of ``name:alias`` from the audit log, oldest first.

    Each row: ``seq``, ``ts``, ``actor``, ``action`` (``alias``, ``promote``,
    ``promote-forced``, removals...), ``old``, ``new`` (digests) and, for forced
    promotions, ``reason``.

    Raises:
        IntegrityError: The audit log is unreadable.
    """
    subject = f"{name}:{alias}"
    rows: list[dict[str, Any]] = []
    for entry in store.audit().entries():
        if entry.get("subject") != subject:
            continue
        if entry.get("action") == REASON_ACTION:
            detail = entry.get("new") or {}
            for row in reversed(rows):
                if row["action"] == "promote-forced" and row["new"] == detail.get("digest"):
                    row["reason"] = detail.get("reason")
                    break
            continue
        old, new = entry.get("old"), entry.get("new")
        reason = None
        if entry.get("action") == "recover" and isinstance(old, dict) and isinstance(new, dict):
            reason = f"{new.get('outcome')}: seq {old.get('seq')} ({new.get('reason')})"
        rows.append({"seq": entry.get("seq"), "ts": entry.get("ts"), "actor": entry.get("actor"),
                     "action": entry.get("action"), "old": old, "new": new, "reason": reason})
    return rows
