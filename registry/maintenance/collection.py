"""Garbage collection: :func:`gc` reclaims blobs and temp files nothing references.

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

On an S3 store there is no gc lock (:meth:`registry.storage.backends.base.Backend.lock` is a no-op);
a push that re-uses an existing blob refreshes its LastModified first
(:meth:`registry.storage.blobs.BlobStore.put_file`) and gc re-stats each candidate right
before deleting it, so only a blob re-used within the milliseconds between that stat
and the delete could be lost -- keep the grace period well above push durations.
"""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.audit.journal import recover, run_mutation
from registry.digests import is_digest
from registry.errors import IntegrityError
from registry.fsutil import is_leased, newest_mtime
from registry.maintenance.integrity import refs_disagreements
from registry.storage.blobs import blob_key
from registry.storage.store import Store


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


def check_refs_audited(store: Store) -> None:
    """Refuse to collect while the store's refs disagree with its audit log.

    gc keeps what the refs reach (bindings, gate and signature pointers). A ref removed or
    edited behind the log's back (a deleted 64-byte binding file, a flipped gate pointer)
    would make a live release's blobs unreachable, and gc would delete them for good; with
    the refs repaired first (``verify --all`` names them), nothing is lost.

    Raises:
        IntegrityError: The log fails its chain check, or ``verify --all`` would report
            ``unaudited`` or ``removed`` refs (binding times aside: they change what a
            bare name means, not what is reachable), persisting over a few looks.
    """
    problems = refs_disagreements(store)
    if problems:
        first = problems[0]
        where = first.used_by[0] if first.used_by else first.digest
        raise IntegrityError(f"gc refused: the store's refs and its audit log disagree "
                             f"({len(problems)} problem(s); first: {where}: {first.detail})",
                             fix="run `adapters verify --all` and repair what it reports "
                                 "before collecting garbage (gc could delete live data)")


def _stale_temp_files(store: Store, cutoff: float) -> list[Path]:
    """Temp files, and temp directories no live command holds (:func:`registry.fsutil.is_leased`)
    whose newest entry is older than cutoff."""
    out = []
    tmp = store.root / "tmp"
    if tmp.is_dir():
        for path in tmp.iterdir():
            if path.is_dir() and not path.is_symlink():
                if is_leased(path):
                    continue  # a running merge, unload, gate or search works in it
                newest = newest_mtime(path)
                if newest is not None and newest < cutoff:
                    out.append(path)
                continue
            if _older(path, cutoff):
                out.append(path)
    for sub in ("names", "gates", "signatures", "audit"):
        base = store.root / sub
        if base.is_dir():
            out += [p for p in base.rglob(".*.tmp") if p.is_file() and _older(p, cutoff)]
    return out


def _older(path: Path, cutoff: float) -> bool:
    """``path`` was last modified before ``cutoff`` (False if it vanished meanwhile)."""
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


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
        dry_run: Report what would be deleted, delete nothing, audit nothing. It also
            works on a store this user may only read (read-only mount, no write
            permission), without the locks and without settling interrupted mutations.
        actor: Who runs it (audit).
        now: Current time (tests).

    Returns:
        A :class:`GcReport`.

    Raises:
        IntegrityError: A bound manifest is unreadable (gc cannot know its files), or the
            refs disagree with the audit log (:func:`check_refs_audited`).
    """
    cutoff = (time.time() if now is None else now) - grace_seconds
    try:
        # refs.lock too: gc is a mutation under the intent protocol (registry.audit.journal),
        # and no other writer may settle its marker while it runs
        with store.backend.lock("gc"), store.backend.lock("refs"):
            recover(store, actor=actor)
            return _collect(store, cutoff, dry_run=dry_run, actor=actor)
    except OSError as err:
        if not dry_run or err.errno not in READ_ONLY_ERRNOS:
            raise
    # A dry run on a store this user may not write (its lock files cannot even be opened):
    # nothing is deleted or settled, so plan without the locks, as `ls` and `verify` read.
    return _collect(store, cutoff, dry_run=True, actor=actor)


READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
"""Why a lock file cannot be opened on a store that may only be read."""


def _collect(store: Store, cutoff: float, *, dry_run: bool, actor: str | None) -> GcReport:
    """Plan (and unless ``dry_run``, carry out and audit) one collection; see :func:`gc`."""
    check_refs_audited(store)
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


__all__ = ["GcReport", "gc", "reachable"]
