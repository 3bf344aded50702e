"""Chain of custody for promotion: a derived model is released only if what it came from passed too.

A policy with ``require_source_gate: true`` makes :func:`gate.promote.promote`
require, besides the candidate's own passing record, a passing record *under the
same policy* for every version on the candidate's lineage path back to the adapters
(:func:`custody_path`): each ancestor reached through lineage parents whose role is
not ``base``, that was itself derived (has non-``base`` parents of its own: a merge,
an unloaded model, a quantized model). The original adapters, which were trained
rather than derived, end the path and need no record (the merge's own gate measures
the merge against them). Parents with role ``base`` (the base model an adapter was
baked into) are context, not custody. So an nf4 model of an unloaded TIES merge of A
and B needs passing records for the nf4 model, the unloaded model and the merge;
a quantized model of an ungated merge is refused (exit 1) naming the merge.

Each record is checked by :func:`gate.records.require_passing_gate`, the same rule as
for the candidate: bound to that version and policy inside the record, vouched for
by the audit log, ``passed: true``.

The policy's content (to know ``require_source_gate``) comes from the blob the gate
stored (``store.put_bytes(policy.canonical_bytes())``: its digest is the policy
digest, re-hashed here), else from the policy file given or pinned, when it still
hashes to the digest (:func:`policy_document`). When neither is available the
promotion is refused (fail closed): a release gate must not guess its own rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.records import require_passing_gate
from registry.digests import sha256_digest
from registry.errors import AdapterkitError, GateFailedError, IntegrityError
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.store import Store

MAX_NODES = 1024
"""Most ancestors followed (a lineage is a DAG of a handful of versions in practice)."""


def policy_document(store: Store, policy_digest: str, policy_file: str | Path | None = None
                    ) -> dict[str, Any] | None:
    """The canonical policy object ``{"policy": ..., "data": ...}`` of ``policy_digest``.

    Read from the store's blob (written by every gate run), else from ``policy_file``
    if it hashes to ``policy_digest``; None when neither has it.

    Raises:
        IntegrityError: The blob exists but does not hash to the digest or parse.
    """
    try:
        with store.open_blob(policy_digest) as handle:
            data = handle.read(1 << 21)
    except AdapterkitError:
        data = None
    except OSError:
        data = None
    if data is not None:
        if sha256_digest(data) != policy_digest:
            raise IntegrityError(f"the stored policy blob {policy_digest[:19]}.. is corrupt",
                                 fix="run `adapters verify --all`")
        try:
            return loads_json(data)
        except ValueError:
            raise IntegrityError(f"the stored policy blob {policy_digest[:19]}.. does not parse",
                                 fix="run `adapters verify --all`") from None
    if policy_file is None:
        return None
    from gate.policy import load_policy

    try:
        pol = load_policy(policy_file, allow_outside_data=True)
    except AdapterkitError:
        return None
    if pol.digest != policy_digest:
        return None
    return json.loads(pol.canonical_bytes())


def requires_source_gate(store: Store, policy_digest: str,
                         policy_file: str | Path | None = None) -> bool:
    """Whether the policy sets ``require_source_gate: true``.

    Raises:
        GateFailedError: The policy's content cannot be read (fail closed).
        IntegrityError: The stored policy blob is corrupt.
    """
    document = policy_document(store, policy_digest, policy_file)
    if document is None:
        short = policy_digest.split(":")[-1][:12]
        raise GateFailedError(f"cannot read policy {short} (no stored copy and no policy file "
                              "with that digest), so its custody rule is unknown",
                              fix="pass --policy gate.yaml (the file with that digest), or pin "
                                  "its path in config.json gate_policy")
    return (document.get("policy") or {}).get("require_source_gate") is True


def _parents(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in (manifest.get("lineage") or {}).get("parents") or []
            if p.get("role", "input") != "base" and p.get("digest")]


def custody_path(store: Store, version: Version) -> list[tuple[dict[str, Any], str]]:
    """``[(lineage entry, child ref), ...]`` of the ancestors that need a record, nearest first.

    Raises:
        GateFailedError: An ancestor's manifest is no longer in the store.
        IntegrityError: A manifest is corrupt.
    """
    out: list[tuple[dict[str, Any], str]] = []
    seen = {version.digest}
    queue = [(p, version.ref) for p in _parents(version.manifest)]
    while queue and len(seen) < MAX_NODES:
        entry, child = queue.pop(0)
        if entry["digest"] in seen:
            continue
        seen.add(entry["digest"])
        try:
            manifest = store.load_manifest(entry["digest"])
        except IntegrityError:
            raise
        except AdapterkitError:
            raise GateFailedError(f"chain of custody broken: {entry.get('ref') or entry['digest']} "
                                  f"({entry.get('role')} of {child}) is no longer in the store",
                                  fix="push it again and gate it, or --force --reason TEXT") from None
        parents = _parents(manifest)
        if not parents:
            continue  # an original adapter: the end of the path
        out.append((entry, child))
        ref = entry.get("ref") or entry["digest"]
        queue.extend((p, ref) for p in parents)
    return out


def require_custody(store: Store, version: Version, policy_digest: str) -> list[str]:
    """Require a passing, vouched-for record under ``policy_digest`` along :func:`custody_path`.

    Returns:
        The refs checked, nearest first.

    Raises:
        GateFailedError: A link has no passing record (the message names it and whose
            parent it is).
        IntegrityError: A record or manifest is corrupt.
    """
    checked = []
    for entry, child in custody_path(store, version):
        ref = entry.get("ref") or entry["digest"]
        try:
            require_passing_gate(store, entry["digest"], ref, policy_digest)
        except GateFailedError as err:
            raise GateFailedError(f"chain of custody: {ref} ({entry.get('role')} of {child}) "
                                  f"is not gated: {err.message}",
                                  fix=f"gate it under the same policy first (`adapters gate "
                                      f"{ref} --base MODEL_DIR`), or --force --reason TEXT") from None
        checked.append(ref)
    return checked
