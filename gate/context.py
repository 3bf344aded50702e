"""What a check sees: the candidate, its parents, its source, the release and an evaluator.

A **candidate** is any registry version -- an adapter, a merge result, or a derived
model (unload / quantize output) -- or a directory:

* an adapter (or a model with stored files) is materialized into a temporary
  directory;
* a derived model recorded **by reference** (kind ``model``, no files) is read from
  ``--model DIR`` or its record's ``location``, after that directory's weights digest
  has been checked against the record (:func:`gate.provenance.verify_model_dir`; a
  mismatch is exit 3 and nothing is evaluated);
* a directory: a PEFT adapter, or a model directory. With a store, a model directory
  is matched to its record by its weights digest and then gated as that version
  (lineage known, result recorded under the version's digest); otherwise it is a
  plain candidate whose digest is ``dir:`` + the digest of its file digests, and
  nothing is recorded for it.

**Parents** are the candidate's *task parents*, resolved through the whole lineage
(:func:`gate.provenance.walk`): a merge's inputs; for a derived model, the inputs of
the merge it was made from (or the adapter itself when it was a plain adapter). A
parent's *name* is the name part of its ref (``adapter-a`` for
``adapter-a@sha256:..``), which is how a policy's retention sets refer to it; the
adapters met on the walk (``ancestors``, e.g. the merge an unloaded model came from)
can be named too. For a plain directory the parents are passed in.

The **source** is what the candidate was made from (drift's reference): the adapter
on the base for an unload, the unquantized model for a quantization (its record's
``location``, or ``--source DIR``; checked against its record before a drift check
runs, :func:`gate.source_check.check_source`). Adapters and merges have none;
``--source`` gives one to a directory.

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

from gate.provenance import (is_model_dir, is_quantized, match_model_dir, model_dir_for, recorded_location,
                             verify_model_dir, walk)
from registry.derived_check import check_model_config
from registry.digests import canonical_json
from registry.errors import BadInputError, NotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gate.evaluate import Evaluator
    from gate.policy import Policy
    from registry.storage.manifest import Version
    from registry.storage.store import Store

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
class Source:
    """What a derived candidate was made from (the drift check's reference).

    Attributes:
        label: Its ref (or directory).
        kind: ``adapter`` (applied to the base) or ``model`` (a model directory).
        dir: Its files; None when it is recorded by reference and no copy is at hand.
        digest: Its version digest (None for a ``--source`` directory of a plain candidate).
        note: Why ``dir`` is None.
        recorded: ``dir`` must be checked against the version's record before use.
    """

    label: str
    kind: str
    dir: Path | None
    digest: str | None = None
    note: str = ""
    recorded: bool = False


@dataclass(frozen=True)
class Candidate:
    """The thing under test, with its files on disk.

    ``kind`` is ``adapter`` or ``model``; ``lineage`` is the version's own lineage and
    ``merge_lineage`` (models only) the lineage of the merge its task parents come
    from, which is what :attr:`method` / :attr:`parameters` describe. ``provenance``
    is what the gate record's meta says about how the candidate was resolved.
    """

    label: str
    dir: Path
    digest: str
    name: str | None = None
    record: dict | None = None
    lineage: dict | None = None
    parents: tuple[Parent, ...] = ()
    stored: bool = False
    kind: str = "adapter"
    source: Source | None = None
    ancestors: tuple[Parent, ...] = ()
    merge_lineage: dict | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def _recipe(self) -> dict[str, Any]:
        lineage = self.merge_lineage if self.kind == "model" else self.lineage
        return (lineage or {}).get("recipe") or {}

    @property
    def method(self) -> str | None:
        """The merge method of its (or, for a model, its merge's) lineage recipe, if any."""
        return self._recipe.get("method")

    @property
    def parameters(self) -> dict[str, Any]:
        """The merge parameters of that recipe."""
        return dict(self._recipe.get("parameters") or {})

    @property
    def quantized(self) -> bool:
        """Whether the candidate is a bitsandbytes-quantized model directory."""
        return is_quantized(self.dir)


def dir_digest(path: Path) -> str:
    """``dir:sha256:..`` over the sorted (relative path, file sha256) pairs of a directory."""
    files = {}
    for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        files[item.relative_to(path).as_posix()] = hashlib.sha256(item.read_bytes()).hexdigest()
    return "dir:sha256:" + hashlib.sha256(canonical_json(files)).hexdigest()


def _dir_kind(path: Path) -> str:
    return "adapter" if (Path(path) / "adapter_config.json").is_file() else "model"


def _given_source(source_dir: Path | None) -> Source | None:
    if source_dir is None:
        return None
    path = Path(source_dir).expanduser()
    if not path.is_dir():
        raise NotFoundError(f"source directory {path} does not exist",
                            fix="pass --source with the model the candidate was made from")
    return Source(label=str(path), kind=_dir_kind(path), dir=path)


def candidate_from_dir(path: Path, *, parents: Sequence[Parent] = (), method: str | None = None,
                       parameters: dict | None = None, store: Store | None = None,
                       workdir: Path | None = None, source_dir: Path | None = None) -> Candidate:
    """A directory as a candidate; ``parents``/``method`` stand in for the lineage a
    registry version would carry. With a ``store``, a model directory whose weights
    digest a recorded model has is gated as that version (:func:`candidate_from_store`).

    Raises:
        BadInputError: ``path`` is not a directory.
        NotFoundError: ``source_dir`` does not exist.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"candidate {path} is not a directory", fix="pass a PEFT adapter directory")
    kind = _dir_kind(path)
    note = None
    if store is not None and kind == "model" and is_model_dir(path) and not parents:
        version, digest = match_model_dir(store, path)
        if version is not None:
            check_model_config(version, path)  # the weights matched; the architecture must too
            return candidate_from_store(store, version.ref, Path(workdir or tempfile.gettempdir()),
                                        source_dir=source_dir, version=version, model_dir=path,
                                        checked={"model_dir": str(path), "weights_digest": digest,
                                                 "matched_by": "weights digest"})
        note = f"no recorded model has its weights digest {digest[:19]}.."
    lineage = None
    if method or parents:
        lineage = {"parents": [{"ref": p.name, "digest": p.digest, "weight": p.weight} for p in parents],
                   "recipe": {"method": method, "parameters": dict(parameters or {})}}
    provenance: dict[str, Any] = {"kind": kind, "directory": str(path)}
    if note:
        provenance["note"] = note
    source = _given_source(source_dir)
    if source is not None:
        provenance["source"] = source.label
    return Candidate(label=str(path), dir=path, digest=dir_digest(path), name=None,
                     lineage=lineage, parents=tuple(parents), kind=kind, source=source,
                     merge_lineage=lineage, provenance=provenance)


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


class _Materializer:
    """Materializes versions under one work directory, each once."""

    def __init__(self, store: Store, workdir: Path) -> None:
        self.store, self.workdir = store, Path(workdir)
        self.dirs: dict[str, Path] = {}

    def __call__(self, version: Version) -> Path:
        if version.digest not in self.dirs:
            self.dirs[version.digest] = self.store.materialize(
                version, self.workdir / f"v-{len(self.dirs)}-{version.digest[7:19]}")
        return self.dirs[version.digest]


def _source(store: Store, version: Version, chain: Sequence[Version], has_source: bool,
            materialize: _Materializer, source_dir: Path | None) -> Source | None:
    """The candidate's source (see module docstring)."""
    if not has_source:
        return _given_source(source_dir)
    src = chain[1]
    if src.kind == "adapter":
        if source_dir is not None:
            raise BadInputError(f"the source of {version.ref} is the adapter {src.ref} applied to "
                                "--base; --source names a quantization's source model",
                                fix="drop --source")
        return Source(label=f"{src.ref} on the base", kind="adapter", dir=materialize(src),
                      digest=src.digest)
    if src.files:
        return Source(label=src.ref, kind="model", dir=materialize(src), digest=src.digest)
    where = Path(source_dir).expanduser() if source_dir is not None else recorded_location(src)
    if where is None or not where.is_dir():
        said = "names no location" if where is None else f"location {where} does not exist"
        return Source(label=src.ref, kind="model", dir=None, digest=src.digest,
                      note=f"source {src.ref} is recorded by reference and its {said}")
    return Source(label=src.ref, kind="model", dir=where, digest=src.digest, recorded=True)


def candidate_from_store(store: Store, ref: str, workdir: Path, *, model_dir: Path | None = None,
                         source_dir: Path | None = None, version: Version | None = None,
                         checked: dict[str, Any] | None = None) -> Candidate:
    """Resolve ``ref`` and its lineage: the candidate's files (materialized, or a
    verified model directory), its task parents, the adapters on its lineage and its source.

    Args:
        store: The registry.
        ref: Any ref.
        workdir: Where versions are materialized.
        model_dir: For a model recorded by reference: its directory (default: ``location``).
        source_dir: The source model's directory when its ``location`` is not at hand.
        version: ``ref`` already resolved.
        checked: ``model_dir`` is already known to hold the recorded weights.

    Raises:
        NotFoundError: Unknown ref or lineage parent; a missing model directory.
        IntegrityError: A blob is corrupt, or ``model_dir`` is not the recorded model.
        BadInputError: ``--model`` for a version with stored files, or ``--source``
            for an unloaded model.
    """
    version = version or store.resolve(ref)
    materialize = _Materializer(store, workdir)
    provenance: dict[str, Any] = {"kind": version.kind}
    if version.kind == "model" and not version.files:
        cand_dir = model_dir_for(version, model_dir)
        provenance.update(checked or verify_model_dir(store, version, cand_dir))
    elif model_dir is not None:
        raise BadInputError(f"--model is for models recorded by reference; {version.ref} has "
                            "its files in the store", fix="drop --model")
    else:
        cand_dir = materialize(version)
    lineage = walk(store, version)
    parents: list[Parent] = []
    if lineage.origin_is_task and lineage.origin is not None:
        origin = lineage.origin
        parents.append(Parent(name=origin.name, dir=materialize(origin), digest=origin.digest,
                              ref=origin.ref))
    for entry in lineage.task_entries:
        try:
            pv = store.version_by_digest(entry["digest"])
        except NotFoundError:
            raise NotFoundError(f"parent {entry.get('ref') or entry['digest']} of "
                                f"{(lineage.origin or version).ref} is not in the store",
                                fix="push the parent, or drop checks that need parents from "
                                    "the policy") from None
        parents.append(Parent(name=parent_name(entry, store), dir=materialize(pv),
                              weight=entry.get("weight"), digest=entry["digest"],
                              ref=entry.get("ref") or pv.ref))
    ancestors = tuple(Parent(name=v.name, dir=materialize(v), digest=v.digest, ref=v.ref)
                      for v in lineage.chain[1:] if v.kind == "adapter"
                      and all(p.digest != v.digest for p in parents))
    source = _source(store, version, lineage.chain, lineage.source is not None, materialize,
                     source_dir)
    provenance.update(chain=[v.ref for v in lineage.chain], parents=[p.ref for p in parents],
                      source=source.label if source else None)
    merge = lineage.origin.lineage if lineage.origin is not None else None
    return Candidate(label=version.ref, dir=cand_dir, digest=version.digest, name=version.name,
                     record=version.record, lineage=version.lineage, parents=tuple(parents),
                     stored=True, kind=version.kind, source=source, ancestors=ancestors,
                     merge_lineage=merge if version.kind == "model" else None,
                     provenance=provenance)


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

    def candidate_model(self) -> PreTrainedModel:
        """The candidate applied to the base (cached)."""
        return self.evaluator.with_adapter("candidate", self.candidate.dir)

    def parent_model(self, parent: Parent) -> PreTrainedModel:
        """A parent applied to the base (cached)."""
        return self.evaluator.with_adapter(f"parent:{parent.name}", parent.dir)

    def parent_named(self, name: str) -> Parent | None:
        """The parent known by ``name`` (or by its full ref or digest)."""
        for p in (*self.candidate.parents, *self.candidate.ancestors):
            if name in (p.name, p.ref, p.digest):
                return p
        return None

    def source_model(self) -> PreTrainedModel | None:
        """The candidate's source loaded (adapter on the base, or model dir), or None."""
        src = self.candidate.source
        if src is None or src.dir is None:
            return None
        return self.evaluator.with_adapter("source", src.dir)

    def release(self) -> Candidate | None:
        """The current release (None, with :attr:`release_note` saying why, if there is none)."""
        if self._release is not _UNSET:
            return self._release
        found = self.release_override
        if found is None:
            found = self._find_release()  # may raise (a release whose directory is gone)
        self._release = found
        return found

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
        if version.kind == "model" and not version.files:
            rdir = model_dir_for(version, None)
            verify_model_dir(self.store, version, rdir)
        else:
            rdir = self.store.materialize(version, self.workdir / "release")
        return Candidate(label=version.ref, dir=rdir, digest=version.digest, name=version.name,
                         record=version.record, lineage=version.lineage, stored=True,
                         kind=version.kind)

    def release_model(self) -> PreTrainedModel | None:
        """The release applied to the base, or None."""
        rel = self.release()
        if rel is None:
            return None
        if rel is self.candidate:
            return self.candidate_model()
        return self.evaluator.with_adapter("release", rel.dir)
