"""Where a candidate comes from: its source, its task parents, its verified directory.

Any version can be gated: an adapter, a merge result, an unloaded model, a quantized
model. What the checks compare it with is read from the **lineage** in the store:

* **source** (what the drift check compares with): the model a derived model was made
  from. For an ``unload`` it is the adapter parent (role ``adapter``) applied to the
  base; for a ``quantize`` it is the model parent (role ``source``; older records
  called it ``base``), a model recorded by reference whose directory is its record's
  ``location`` or ``--source DIR``. Adapters and merges have no source.
* **task parents** (what retention and ``baseline: parents`` score against): the
  walk follows each derived model to its source, up to the adapter at the end of the
  chain; that adapter's merge inputs are the task parents (a plain adapter is its own
  task parent). A ``base`` role parent is context, never a task parent. So a
  quantized model of an unloaded merge of A and B is scored against A and B.
* **chain**: every version on that walk (for messages and the gate record's meta).

A derived model recorded by reference has no files in the store: its directory
(``--model DIR``, else the record's ``location``) is **verified first** against the
record's ``weights.weights_digest`` (:func:`verify_model_dir`, which uses
:func:`registry.derived_check.check_model_dir` and so names the first differing
tensor when the store holds the tensor list); a mismatch is an IntegrityError (exit 3)
before anything is evaluated. Conversely a model *directory* given to the gate is
matched to its record by the same digest (:func:`match_model_dir`), so its lineage is
known whether it is named by ref or by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.reader import StoreReader

SOURCE_ROLES = {"unload": ("adapter",), "quantize": ("source", "input", "base")}
"""Lineage method -> the parent roles that name the source, in order of preference."""
MAX_CHAIN = 32


@dataclass(frozen=True)
class Walk:
    """The lineage walk of one version (see module docstring).

    Attributes:
        chain: The version, then each source up to the last one known.
        source: The lineage entry of the version's own source, or None.
        origin: The adapter the chain ends at (None when it ends at a model).
        task_entries: Lineage entries of the task parents (merge inputs of ``origin``).
        origin_is_task: ``origin`` itself is the task parent (a plain adapter unloaded).
    """

    chain: tuple[Version, ...]
    source: dict[str, Any] | None
    origin: Version | None
    task_entries: tuple[dict[str, Any], ...]
    origin_is_task: bool


def source_entry(version: Version) -> dict[str, Any] | None:
    """The lineage parent a derived model was made from (None for adapters and merges)."""
    lineage = version.lineage or {}
    roles = SOURCE_ROLES.get(((lineage.get("recipe") or {}).get("method")) or "")
    if version.kind != "model" or not roles:
        return None
    parents = lineage.get("parents") or []
    for role in roles:
        for entry in parents:
            if entry.get("role") == role:
                return entry
    return None


def _lookup(store: StoreReader, entry: dict[str, Any], of: Version) -> Version:
    try:
        return store.version_by_digest(entry["digest"])
    except NotFoundError:
        raise NotFoundError(f"lineage parent {entry.get('ref') or entry['digest']} of {of.ref} "
                            "is not in the store", fix="push (or record) the parent again, or "
                            "drop the checks that need it from the policy") from None


def walk(store: StoreReader, version: Version) -> Walk:
    """Follow ``version``'s sources up to the adapter they start from.

    Raises:
        NotFoundError: A source named by the lineage is not in the store.
        IntegrityError: A manifest is corrupt, or the lineage loops.
    """
    chain = [version]
    first = source_entry(version)
    current, entry = version, first
    while entry is not None:
        if len(chain) >= MAX_CHAIN or any(v.digest == entry["digest"] for v in chain):
            raise IntegrityError(f"the lineage of {version.ref} loops or is deeper than {MAX_CHAIN}",
                                 fix="run `adapters verify --all`")
        current = _lookup(store, entry, current)
        chain.append(current)
        entry = source_entry(current)
    if current.kind != "adapter":
        return Walk(tuple(chain), first, None, (), False)
    inputs = tuple(e for e in ((current.lineage or {}).get("parents") or [])
                   if e.get("role", "input") != "base")
    if current is version:
        return Walk(tuple(chain), first, current, inputs, False)
    return Walk(tuple(chain), first, current, inputs, not inputs)


def recorded_location(version: Version) -> Path | None:
    """The ``location`` a derived model's record names, if any."""
    location = version.record.get("location") if version.kind == "model" else None
    return Path(location).expanduser() if isinstance(location, str) and location else None


def verify_model_dir(store: StoreReader, version: Version, model_dir: Path) -> dict[str, Any]:
    """Check that ``model_dir`` holds exactly the weights ``version`` records.

    Returns:
        ``{"model_dir", "weights_digest", "tensors"}`` when every tensor matches.

    Raises:
        IntegrityError: The directory's weights digest differs from the record's.
        NotFoundError: The directory does not exist.
        BadInputError: ``version`` is not a derived model, or no readable weights.
    """
    if not model_dir.is_dir():
        raise NotFoundError(f"model directory {model_dir} of {version.ref} does not exist",
                            fix="pass --model DIR with the deployed copy of this model")
    from registry.derived_check import check_model_dir

    try:
        checked = check_model_dir(store, version, model_dir)
    except IntegrityError as err:
        raise IntegrityError(f"{err.message}; nothing was evaluated", fix=err.fix) from None
    return {"model_dir": str(model_dir), "weights_digest": checked.weights_digest,
            "tensors": checked.tensors}


def is_quantized(path: Path) -> bool:
    """Whether ``path/config.json`` carries a ``quantization_config`` (bitsandbytes)."""

    try:
        config = loads_json((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("quantization_config"))


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` looks like a full model directory (not a PEFT adapter)."""
    return (not (path / "adapter_config.json").is_file()
            and ((path / "model.safetensors").is_file()
                 or (path / "model.safetensors.index.json").is_file()))


def match_model_dir(store: StoreReader, path: Path) -> tuple[Version | None, str]:
    """The recorded model whose weights digest equals ``path``'s, and that digest.

    Several versions may record the same weights (re-recorded under another name or
    location, or unloaded onto a base that differs only in ``config.json``): those whose
    recorded config digest is the directory's come first (a record without one matches any
    config), then the one whose ``location`` is ``path``, else the newest.

    Raises:
        BadInputError: No readable safetensors weights, or a malformed ``config.json``.
        NotFoundError: A listed shard is missing.
    """
    from registry.derived_check import config_digest
    from registry.formats.fingerprint import fingerprint_model

    digest = str(fingerprint_model(path).weights_digest)
    found = [v for v in store.versions() if v.kind == "model"
             and (v.record.get("weights") or {}).get("weights_digest") == digest]
    if not found:
        return None, digest
    config = config_digest(path)
    exact = [v for v in found if config is not None and v.record.get("config") == config]
    unbound = [v for v in found if v.record.get("config") is None]  # records older than the check
    found = exact or unbound or found  # none: the caller's config check names the difference
    here = [v for v in found if recorded_location(v) is not None
            and recorded_location(v).resolve() == path.resolve()]  # type: ignore[union-attr]
    return (here or found)[0], digest


def model_dir_for(version: Version, model_dir: Path | None) -> Path:
    """The directory to gate for a derived model: ``--model``, else its ``location``.

    Raises:
        BadInputError: Neither is known.
    """
    if model_dir is not None:
        return Path(model_dir).expanduser()
    location = recorded_location(version)
    if location is None:
        raise BadInputError(f"{version.ref} is recorded by reference and its record names no "
                            "location", fix="pass --model DIR with the model's directory")
    return location
