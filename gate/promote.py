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
   (:func:`registry.audit.index.vouched_gate`), and say ``passed: true``. Otherwise
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

:func:`alias_history` reads the audit log back: every move of ``NAME:ALIAS``, oldest
first, with the reason attached to forced promotions ("what was released when").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.digests import is_digest
from registry.errors import BadInputError, GateFailedError
from registry.storage.store import ANY

if TYPE_CHECKING:
    from registry.storage.store import Store

REASON_ACTION = "promote-forced-reason"
CONFIG_KEY = "gate_policy"
TRUSTED_KEYS_KEY = "trusted_keys"


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


def configured_trusted_keys(store: Store, given: Sequence[Path] = ()) -> list[Path]:
    """Trusted signing keys for promotion: ``given``, else ``config.json`` ``trusted_keys``.

    Raises:
        BadInputError: ``trusted_keys`` in config.json is not a list of paths.
    """
    if given:
        return [Path(p).expanduser() for p in given]
    setting = store.config.get(TRUSTED_KEYS_KEY)
    if setting is None:
        return []
    if isinstance(setting, str):
        setting = [setting]
    if not isinstance(setting, list) or not all(isinstance(p, str) and p for p in setting):
        raise BadInputError(f"config.json {TRUSTED_KEYS_KEY} must be a list of key paths, got {setting!r}",
                            fix="e.g. \"trusted_keys\": [\"keys/release.pub\"]")
    root = Path(store.root)
    return [p if p.is_absolute() else root / p for p in (Path(x).expanduser() for x in setting)]


def configured_policy(store: Store, policy: str | Path | None = None) -> tuple[str, str]:
    """``(policy digest, where it came from)`` for promotion.

    Raises:
        BadInputError: No policy given or configured, a bad config value, an unreadable
            or invalid policy, or a policy file that no longer matches the pinned digest.
    """
    from gate.policy import load_policy

    if policy is not None:
        return load_policy(policy, allow_outside_data=True).digest, str(policy)  # hashed only
    pinned = pinned_policy(store)
    if pinned is None:
        raise BadInputError("no gate policy given and none configured for this store",
                            fix=f"pass --policy gate.yaml, or set \"{CONFIG_KEY}\" in the "
                            "store's config.json to a policy path or {\"digest\": \"sha256:...\"}")
    return pinned


def pinned_policy(store: Store) -> tuple[str, str] | None:
    """``(digest, where)`` of the policy the store's ``config.json`` pins, or None.

    Raises:
        BadInputError: A bad config value, an unreadable or invalid policy file, or a
            policy file that no longer matches the pinned digest.
    """
    from gate.policy import load_policy

    setting = store.config.get(CONFIG_KEY)
    fix = (f"pass --policy gate.yaml, or set \"{CONFIG_KEY}\" in the store's config.json "
           "to a policy path or {\"digest\": \"sha256:...\"}")
    if setting is None:
        return None
    if isinstance(setting, str):
        setting = {"path": setting}
    if not isinstance(setting, dict) or not (setting.get("path") or setting.get("digest")):
        raise BadInputError(f"config.json {CONFIG_KEY} must be a path or an object with "
                            f"'path' and/or 'digest', got {setting!r}", fix=fix)
    pinned = setting.get("digest")
    if pinned is not None and not is_digest(pinned):
        raise BadInputError(f"config.json {CONFIG_KEY}.digest is not a sha256 digest: {pinned!r}",
                            fix=fix)
    if not setting.get("path"):
        return pinned, f"config.json {CONFIG_KEY}.digest"
    path = Path(setting["path"]).expanduser()
    if not path.is_absolute():
        path = Path(store.root) / path
    # promote only hashes the policy's data for its digest (the gate, which reads the
    # data, is where --allow-outside-data is decided)
    digest = load_policy(path, allow_outside_data=True).digest
    if pinned is not None and digest != pinned:
        raise BadInputError(f"policy {path} now has digest {digest}, but config.json pins {pinned}",
                            fix="restore the policy (and its eval data), or update the pinned digest")
    return digest, str(path)


def failed_summary(record: dict[str, Any]) -> str:
    """``"retention (fail: ...); structural (error: ...)"`` from a stored gate record."""
    bad = [c for c in record.get("checks") or [] if c.get("status") in ("fail", "error")]
    return "; ".join(f"{c.get('name')} ({c.get('status')}: {c.get('message')})" for c in bad) \
        or "the record says passed is not true"


def require_passing_gate(store: Store, digest: str, ref: str, policy_digest: str) -> dict:
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


def _check_binding(store: Store, record: dict, digest: str, ref: str, policy_digest: str) -> None:
    """Raise unless ``record`` is bound to (digest, policy) and vouched for by the log."""
    from registry.audit.index import vouched_gate

    fix = f"gate it: `adapters gate {ref} --base MODEL_DIR --policy gate.yaml`"
    if record.get("candidate_digest") != digest or record.get("policy_digest") != policy_digest:
        raise GateFailedError(f"the gate record stored for {ref} was made for "
                              f"{str(record.get('candidate_digest'))[:19]}.. under policy "
                              f"{str(record.get('policy_digest'))[:19]}.., not for this version "
                              "and policy (copied?)", fix=fix)
    entry = vouched_gate(store, digest, policy_digest)
    pointer = store.read_pointer(store.gate_key(digest, policy_digest))
    if entry is None or (entry.get("new") or {}).get("record") != pointer:
        raise GateFailedError(f"no audit entry vouches for the gate record of {ref} "
                              "(written outside adapterkit?)",
                              fix=f"run `adapters verify --all`; then {fix}")


def _gate_pointers(store: Store) -> list[tuple[str, str, str]]:
    try:
        return list(store.gate_pointers())
    except Exception:  # noqa: BLE001 - only used for a hint in an error message
        return []


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


def _policy_file(store: Store, given: str | Path | None) -> str | Path | None:
    """The policy file to read the policy's content from: given, else the pinned path."""
    if given is not None:
        return given
    setting = store.config.get(CONFIG_KEY)
    path = setting if isinstance(setting, str) else \
        setting.get("path") if isinstance(setting, dict) else None
    if not isinstance(path, str) or not path:
        return None
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else Path(store.root) / resolved


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
    if force and not (reason and reason.strip()):
        raise BadInputError("--force requires --reason", fix="say why: --force --reason 'hotfix for ...'")
    if not force and not policy_digest:
        raise BadInputError("promotion needs the gate policy digest",
                            fix="pass --policy gate.yaml or configure gate_policy")
    _require_pinned(store, policy_digest, force)
    version = store.resolve(ref)
    record = None
    custody: tuple[str, ...] = ()
    if not force:
        from gate.custody import require_custody, requires_source_gate
        from gate.default_policy import refuse_unpinned_default

        refuse_unpinned_default(store, policy_digest)
        record = require_passing_gate(store, version.digest, version.ref, policy_digest)  # type: ignore[arg-type]
        if requires_source_gate(store, policy_digest, _policy_file(store, policy_file)):  # type: ignore[arg-type]
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
    old = store.set_alias(version.name, alias, version.digest,
                          expect=expect, actor=actor, action=action,
                          protected_ok=True, notes=notes)
    return PromoteResult(name=version.name, alias=alias, digest=version.digest, ref=version.ref,
                         old=old, forced=force, reason=reason.strip() if force and reason else None,
                         policy_digest=policy_digest, gate_passed=gate_passed, signed_by=signed_by,
                         custody=custody)


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
        rows.append({"seq": entry.get("seq"), "ts": entry.get("ts"), "actor": entry.get("actor"),
                     "action": entry.get("action"), "old": entry.get("old"),
                     "new": entry.get("new"), "reason": None})
    return rows
