"""What a check sees: the candidate, its parents, the release baseline and an evaluator.

A **candidate** is either a registry version (an adapter, a merge result, or a
derived model with stored files), materialized into a temporary directory, or a
plain PEFT directory (library use and tests; its digest is ``dir:`` + the digest of
its file digests, and nothing is recorded in a registry for it).

**Parents** come from the candidate's lineage record (``lineage.parents``: digest,
ref, weight), each materialized from the store; for a plain directory they are
passed in. A parent's *name* is the name part of its ref (``adapter-a`` for
``adapter-a@sha256:..``), which is how a policy's retention sets refer to it.

The **release** baseline is the version the ``release`` alias of the candidate's
name points at (or the policy's ``release`` ref), resolved on first use; when no
release exists yet, checks relative to it are skipped.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.common import canonical_json
from registry.errors import BadInputError, NotFoundError

if TYPE_CHECKING:
    from gate.evaluate import Evaluator
    from gate.policy import Policy
    from registry.store import Store

_UNSET: Any = object()


@dataclass(frozen=True)
class Parent:
    """One input of a merge: its name, files and merge weight."""

    name: str
    dir: Path
    weight: float | None = None
    digest: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Candidate:
    """The thing under test, with its files on disk."""

    label: str
    dir: Path
    digest: str
    name: str | None = None
    record: dict | None = None
    lineage: dict | None = None
    parents: tuple[Parent, ...] = ()
    stored: bool = False

    @property
    def method(self) -> str | None:
        """The merge method of its lineage recipe, if any."""
        recipe = (self.lineage or {}).get("recipe") or {}
        return recipe.get("method")

    @property
    def parameters(self) -> dict[str, Any]:
        """The merge parameters of its lineage recipe."""
        recipe = (self.lineage or {}).get("recipe") or {}
        return dict(recipe.get("parameters") or {})


def dir_digest(path: Path) -> str:
    """``dir:sha256:..`` over the sorted (relative path, file sha256) pairs of a directory."""
    files = {}
    for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        files[item.relative_to(path).as_posix()] = hashlib.sha256(item.read_bytes()).hexdigest()
    return "dir:sha256:" + hashlib.sha256(canonical_json(files)).hexdigest()


def candidate_from_dir(path: Path, *, parents: Sequence[Parent] = (), method: str | None = None,
                       parameters: dict | None = None) -> Candidate:
    """A plain PEFT (or model) directory as a candidate; ``parents``/``method`` stand in
    for the lineage a registry version would carry.

    Raises:
        BadInputError: ``path`` is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"candidate {path} is not a directory", fix="pass a PEFT adapter directory")
    lineage = None
    if method or parents:
        lineage = {"parents": [{"ref": p.name, "digest": p.digest, "weight": p.weight} for p in parents],
                   "recipe": {"method": method, "parameters": dict(parameters or {})}}
    return Candidate(label=str(path), dir=path, digest=dir_digest(path), name=None,
                     lineage=lineage, parents=tuple(parents))


def parent_name(entry: dict[str, Any], store: Store | None) -> str:
    """The name a lineage parent is known by (name part of its ref, else from the store)."""
    ref = entry.get("ref")
    if isinstance(ref, str) and ref:
        return ref.split("@", 1)[0]
    if store is not None:
        try:
            return store.version_by_digest(entry["digest"]).name
        except Exception:  # noqa: BLE001 - a nameless parent keeps its digest as its name
            pass
    return str(entry.get("digest"))


def candidate_from_store(store: Store, ref: str, workdir: Path) -> Candidate:
    """Resolve ``ref``, materialize it and its lineage parents under ``workdir``.

    Raises:
        NotFoundError: Unknown ref or parent.
        IntegrityError: A blob is corrupt.
        BadInputError: The version has no stored files.
    """
    version = store.resolve(ref)
    cand_dir = store.materialize(version, Path(workdir) / "candidate")
    parents = []
    lineage = version.lineage
    for i, entry in enumerate((lineage or {}).get("parents") or []):
        try:
            pv = store.version_by_digest(entry["digest"])
        except NotFoundError:
            raise NotFoundError(f"parent {entry.get('ref') or entry['digest']} of {version.ref} "
                                "is not in the store", fix="push the parent, or drop checks "
                                "that need parents from the policy") from None
        pdir = store.materialize(pv, Path(workdir) / f"parent-{i}")
        parents.append(Parent(name=parent_name(entry, store), dir=pdir, weight=entry.get("weight"),
                              digest=entry["digest"], ref=entry.get("ref") or pv.ref))
    return Candidate(label=version.ref, dir=cand_dir, digest=version.digest, name=version.name,
                     record=version.record, lineage=lineage, parents=tuple(parents), stored=True)


@dataclass
class GateContext:
    """Shared state of one gate run (models are cached in ``evaluator``)."""

    policy: Policy
    base_dir: Path
    candidate: Candidate
    evaluator: Evaluator
    store: Store | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    release_override: Candidate | None = None
    _release: Any = field(default=_UNSET, repr=False)
    release_note: str = ""

    def candidate_model(self) -> Any:
        """The candidate applied to the base (cached)."""
        return self.evaluator.with_adapter("candidate", self.candidate.dir)

    def parent_model(self, parent: Parent) -> Any:
        """A parent applied to the base (cached)."""
        return self.evaluator.with_adapter(f"parent:{parent.name}", parent.dir)

    def parent_named(self, name: str) -> Parent | None:
        """The parent known by ``name`` (or by its full ref or digest)."""
        for p in self.candidate.parents:
            if name in (p.name, p.ref, p.digest):
                return p
        return None

    def release(self) -> Candidate | None:
        """The current release (None, with :attr:`release_note` saying why, if there is none)."""
        if self._release is not _UNSET:
            return self._release
        self._release = self.release_override
        if self._release is None:
            self._release = self._find_release()
        return self._release

    def _find_release(self) -> Candidate | None:
        ref = self.policy.release or (f"{self.candidate.name}:release" if self.candidate.name else None)
        if ref is None or self.store is None:
            self.release_note = "no registry release to compare with (candidate is not a registry version)"
            return None
        try:
            version = self.store.resolve(ref)
        except NotFoundError:
            self.release_note = f"{ref} does not exist yet; nothing released to compare with"
            return None
        if version.digest == self.candidate.digest:
            return self.candidate
        rdir = self.store.materialize(version, self.workdir / "release")
        return Candidate(label=version.ref, dir=rdir, digest=version.digest, name=version.name,
                         record=version.record, lineage=version.lineage, stored=True)

    def release_model(self) -> Any:
        """The release applied to the base, or None."""
        rel = self.release()
        if rel is None:
            return None
        if rel is self.candidate:
            return self.candidate_model()
        return self.evaluator.with_adapter("release", rel.dir)
