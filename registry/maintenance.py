"""Store maintenance: :func:`verify` (re-hash everything) and :func:`gc` (reclaim space).

``verify`` starts from name bindings (one ref or all of them), aliases, gate
records and signatures, re-hashes every blob they reference (manifests, adapter
files, gate records, signature envelopes; each blob once) and reports each missing
or corrupt blob together with every version that uses it. Given trusted keys it
also checks that every selected version carries a valid signature from one of them
(problems ``unsigned`` / ``bad_signature``). It never raises for a damaged store; it
reports.

``gc`` takes ``locks/gc.lock`` exclusively (pushes hold it shared for their whole
duration, so no push is between writing blobs and binding them), marks what is
reachable -- manifests bound by a name, their files, manifests still named as
lineage parents (so history outlives a deleted binding), gate-record blobs and the
policies they were made under, signature envelopes, derived models' per-tensor
lists (named by their weights digest), a searched merge's trials blob -- and
deletes only unreachable blobs whose mtime is older than the grace period, plus
stale temp files (``tmp/`` entries, including work directories whose newest
file is older than the grace, and interrupted atomic writes). It refuses to run when
a bound manifest cannot be read, since it could not know which files that version
needs. A real (not dry) run is audited as ``gc``.

On an S3 store there is no gc lock (:meth:`registry.backends.Backend.lock` is a no-op);
a push that re-uses an existing blob refreshes its LastModified first
(:meth:`registry.blobs.BlobStore.put_file`) and gc re-stats each candidate right
before deleting it, so only a blob re-used within the milliseconds between that stat
and the delete could be lost -- keep the grace period well above push durations.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.blobs import ProgressCallback, blob_key
from registry.common import is_digest
from registry.errors import AdapterkitError, IntegrityError
from registry.audit_index import cross_check
from registry.journal import recover, run_mutation
from registry.manifest import check_manifest
from registry.store import Store


@dataclass(frozen=True)
class BlobProblem:
    """A problem found by :func:`verify`.

    Attributes:
        kind: ``missing``, ``corrupt``, ``bad_manifest`` (hashes fine but unreadable
            or bound under another name), ``dangling_alias``, ``unaudited`` (a binding,
            alias target, gate record or signature that no effective audit entry
            explains, see :mod:`registry.audit_index`), and with trusted keys
            ``unsigned`` (no valid signature by a trusted key) or ``bad_signature``
            (a trusted key's signature does not verify: forged, edited or replayed).
        digest: The blob (or alias target) concerned.
        used_by: Who needs it, e.g. ``["lora-a@sha256:ab.. adapter_model.safetensors"]``.
        detail: Extra explanation (actual digest of a corrupt blob...).
    """

    kind: str
    digest: str
    used_by: tuple[str, ...]
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "digest": self.digest, "used_by": list(self.used_by),
                "detail": self.detail}


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        versions: Number of versions checked.
        blobs: Number of distinct blobs re-hashed.
        bytes: Bytes re-hashed.
        problems: Every missing/corrupt blob, one entry per blob.
        signed: Versions with a valid trusted signature (None: signatures not checked).
    """

    versions: int
    blobs: int
    bytes: int
    problems: list[BlobProblem] = field(default_factory=list)
    signed: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is missing or corrupt."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"ok": self.ok, "versions": self.versions, "blobs": self.blobs,
                "bytes": self.bytes, "problems": [p.to_json() for p in self.problems],
                "signed": self.signed}


class _Checker:
    def __init__(self, store: Store, progress: ProgressCallback | None) -> None:
        self.store, self.progress = store, progress
        self.uses: dict[str, list[str]] = {}
        self.results: dict[str, str | None] = {}
        self.bytes = 0
        self.extra: list[BlobProblem] = []

    def use(self, digest: str, who: str) -> None:
        self.uses.setdefault(digest, []).append(who)

    def hash(self, digest: str) -> str | None:
        if digest not in self.results:
            self.results[digest] = self.store.blobs.hash_blob(digest, self.progress)
            if self.results[digest] is not None:
                self.bytes += self.store.blobs.size(digest) or 0
        return self.results[digest]

    def version(self, name: str, digest: str) -> None:
        label = f"{name}@{digest}"
        self.use(digest, f"{label} (manifest)")
        if self.hash(digest) != digest:
            return
        try:
            manifest = check_manifest(json.loads(self.store.blobs.read(digest)), digest)
        except (ValueError, AdapterkitError) as err:
            self.extra.append(BlobProblem("bad_manifest", digest, (label,), str(err)))
            return
        if manifest.get("name") != name:
            self.extra.append(BlobProblem("bad_manifest", digest, (label,),
                                          f"manifest is for {manifest.get('name')!r}"))
        for entry in manifest["files"]:
            self.use(entry["digest"], f"{label} {entry['path']}")


def verify(store: Store, ref: str | None = None, *,
           progress: ProgressCallback | None = None,
           trusted: dict[str, Any] | None = None) -> VerifyReport:
    """Re-hash every blob reachable from ``ref`` (None: the whole store).

    Args:
        store: The store.
        ref: One version (plus its gate records and signatures), or None for every
            name, alias, gate record and signature.
        progress: Called with bytes hashed.
        trusted: Key id -> public key (:func:`registry.signing.load_trusted_keys`):
            also require a valid trusted signature on every selected version.

    Returns:
        A :class:`VerifyReport` listing each missing or corrupt blob and its users.

    Raises:
        NotFoundError / BadInputError: ``ref`` does not resolve.
    """
    checker = _Checker(store, progress)
    if ref is not None:
        targets = [store.resolve_digest(ref)]
    else:
        targets = store.bindings()
        for name in store.names():
            for alias, digest in store.aliases(name).items():
                if not store.is_bound(name, digest):
                    checker.extra.append(BlobProblem("dangling_alias", digest,
                                                     (f"{name}:{alias}",),
                                                     "alias points at an unbound version"))
    wanted = {d for _, d in targets}
    for name, digest in targets:
        checker.version(name, digest)
    for cand, policy, record in store.gate_pointers():
        if ref is None or cand in wanted:
            checker.use(record, f"gate record {cand[:19]}../{policy[:19]}..")
    for version_digest, keyid, envelope in store.signature_pointers():
        if ref is None or version_digest in wanted:
            checker.use(envelope, f"signature {version_digest[:19]}.. by {keyid[:19]}..")
    problems = list(checker.extra)
    for digest, users in checker.uses.items():
        actual = checker.hash(digest)
        if actual is None:
            problems.append(BlobProblem("missing", digest, tuple(users), "blob file is absent"))
        elif actual != digest:
            problems.append(BlobProblem("corrupt", digest, tuple(users),
                                        f"content hashes to {actual}"))
    if ref is None:
        problems += _unaudited(store)
    signed = None
    if trusted is not None:
        signed, found = _check_signatures(store, targets, trusted)
        problems += found
    problems.sort(key=lambda p: (p.kind, p.digest))
    return VerifyReport(versions=len(targets), blobs=len(checker.results), bytes=checker.bytes,
                        problems=problems, signed=signed)


def _unaudited(store: Store) -> list[BlobProblem]:
    """Bindings, aliases, gate records and signatures the audit log does not explain."""
    try:
        found = cross_check(store)
    except IntegrityError as err:
        return [BlobProblem("unaudited", "", ("audit log",), err.message)]
    return [BlobProblem("unaudited", u.digest, (u.key,), u.detail) for u in found]


def _check_signatures(store: Store, targets: list[tuple[str, str]],
                      trusted: dict[str, Any]) -> tuple[int, list[BlobProblem]]:
    """``(versions validly signed, problems)`` for every target binding."""
    from registry.signing import check_version

    signed, problems = 0, []
    for name, digest in targets:  # bindings only: a damaged manifest is reported above
        check = check_version(store, name, digest, trusted)
        label = (f"{name}@{digest}",)
        if check.invalid_keyids:
            problems.append(BlobProblem("bad_signature", digest, label,
                                        "signature by trusted key "
                                        f"{', '.join(check.invalid_keyids)} does not verify"))
        elif not check.valid_keyids:
            others = (f"; signed only by untrusted {', '.join(check.untrusted_keyids)}"
                      if check.untrusted_keyids else "")
            problems.append(BlobProblem("unsigned", digest, label,
                                        f"no valid signature by a trusted key{others}"))
        else:
            signed += 1
    return signed, problems


@dataclass(frozen=True)
class GcReport:
    """Result of :func:`gc`.

    Attributes:
        removed: Digests of blobs deleted (or that would be, in a dry run).
        freed_bytes: Their total size.
        kept_reachable: Number of reachable blobs.
        kept_young: Unreachable blobs kept because they are younger than the grace.
        temp_removed: Stale temp files deleted (paths relative to the store).
        dry_run: Nothing was deleted.
    """

    removed: list[str]
    freed_bytes: int
    kept_reachable: int
    kept_young: list[str]
    temp_removed: list[str]
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"removed": self.removed, "freed_bytes": self.freed_bytes,
                "kept_reachable": self.kept_reachable, "kept_young": self.kept_young,
                "temp_removed": self.temp_removed, "dry_run": self.dry_run}


def reachable(store: Store) -> set[str]:
    """Digests of every blob gc must keep.

    Raises:
        IntegrityError: A bound manifest is missing or corrupt (run verify first).
    """
    keep: set[str] = set()
    pending = [digest for _, digest in store.bindings()]
    bound = set(pending)
    while pending:
        digest = pending.pop()
        if digest in keep:
            continue
        try:
            manifest = store.load_manifest(digest)
        except IntegrityError as err:
            if digest not in bound:  # an ancestor's manifest already gone: nothing to keep
                continue
            raise IntegrityError(f"gc refused: {err.message}",
                                 fix="run `adapters verify --all` and repair or delete the "
                                     "damaged version first") from None
        keep.add(digest)
        if digest in bound:
            keep.update(entry["digest"] for entry in manifest["files"])
            # a derived model's per-tensor list is the blob its weights digest names
            # (rebuild and verify --model name the differing tensor from it)
            weights = (manifest.get("record") or {}).get("weights") or {}
            if is_digest(weights.get("weights_digest")):
                keep.add(weights["weights_digest"])
            # a searched merge's trials (every trial's parameters and scores)
            report = (manifest.get("lineage") or {}).get("report") or {}
            search = report.get("search") if isinstance(report, dict) else None
            if isinstance(search, dict) and is_digest(search.get("trials_digest")):
                keep.add(search["trials_digest"])
        pending.extend(p["digest"] for p in (manifest.get("lineage") or {}).get("parents", [])
                       if is_digest(p.get("digest")))
    for _, policy, record in store.gate_pointers():
        keep.update((record, policy))  # the gate stores the policy it applied under its digest
    keep.update(envelope for _, _, envelope in store.signature_pointers())
    return keep


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for child in path.rglob("*"):
        try:
            newest = max(newest, child.stat().st_mtime)
        except FileNotFoundError:
            pass
    return newest


def _stale_temp_files(store: Store, cutoff: float) -> list[Path]:
    """Temp files (and temp directories whose newest entry is stale) older than cutoff."""
    out = []
    tmp = store.root / "tmp"
    if tmp.is_dir():
        for path in tmp.iterdir():
            if path.is_dir() and not path.is_symlink():
                if _newest_mtime(path) < cutoff:
                    out.append(path)
            elif path.lstat().st_mtime < cutoff:
                out.append(path)
    for sub in ("names", "gates", "signatures", "audit"):
        base = store.root / sub
        if base.is_dir():
            out += [p for p in base.rglob(".*.tmp") if p.is_file() and p.stat().st_mtime < cutoff]
    return out


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def gc(store: Store, grace_seconds: float = 3600.0, *, dry_run: bool = False,
       actor: str | None = None, now: float | None = None) -> GcReport:
    """Delete unreachable blobs older than ``grace_seconds`` and stale temp files.

    Args:
        store: The store.
        grace_seconds: Keep anything modified more recently than this.
        dry_run: Report what would be deleted, delete nothing, audit nothing.
        actor: Who runs it (audit).
        now: Current time (tests).

    Returns:
        A :class:`GcReport`.

    Raises:
        IntegrityError: A bound manifest is unreadable (gc cannot know its files).
    """
    cutoff = (time.time() if now is None else now) - grace_seconds
    # refs.lock too: gc is a mutation under the intent protocol (registry.journal), and
    # no other writer may settle its marker while it runs
    with store.backend.lock("gc"), store.backend.lock("refs"):
        recover(store, actor=actor)
        keep = reachable(store)
        present = store.blobs.all_digests()
        planned: list[tuple[str, int]] = []
        young: list[str] = []
        for digest in present:
            if digest in keep:
                continue
            stat = store.backend.stat(blob_key(digest))
            if stat is None:
                continue
            (young.append(digest) if stat.mtime >= cutoff else planned.append((digest, stat.size)))
        temps = _stale_temp_files(store, cutoff)
        removed: list[str] = []
        freed = 0

        def delete() -> None:
            nonlocal freed
            for digest, size in planned:
                # stat right before deleting: a push that re-used this blob since gc listed
                # it has touched it, so it is young now (the only guard on S3, with no lock)
                stat = store.backend.stat(blob_key(digest))
                if stat is None or stat.mtime >= cutoff:
                    continue
                store.backend.delete(blob_key(digest))
                removed.append(digest)
                freed += size
            for path in temps:
                _remove(path)

        if dry_run:
            removed, freed = [d for d, _ in planned], sum(size for _, size in planned)
        else:
            run_mutation(store, "gc", store.location, old=None, actor=actor, apply=delete,
                         new={"removed": len(planned), "freed_bytes": sum(s for _, s in planned),
                              "temp_removed": len(temps)})
    return GcReport(removed=removed, freed_bytes=freed,
                    kept_reachable=len(keep.intersection(present)),
                    kept_young=young, temp_removed=[str(p.relative_to(store.root)) for p in temps],
                    dry_run=dry_run)


__all__ = ["BlobProblem", "GcReport", "VerifyReport", "gc", "reachable", "verify"]
