"""The one way an adapter directory becomes a version: validate, fingerprint, record, push.

``adapters push``, ``adapters pull`` (Hub) and ``adapters merge`` all store a PEFT
directory the same way, and the order matters, so it is written once here:

1. :func:`registry.ingest.prepare_adapter` -- the only door for adapter bytes: config
   and safetensors header checks, ``.bin`` conversion when allowed, and with a base
   model directory every LoRA module checked against its base weight's shape;
2. the base model's fingerprint (:func:`registry.formats.fingerprint.fingerprint_model`)
   when a base directory is given -- or one the caller already has (a merge carries its
   parents' fingerprint);
3. the adapter record (:func:`registry.record.build_record`) from the validated config,
   the tensor summary and the caller's :class:`AdapterMetadata`;
4. :meth:`registry.storage.store.Store.push` with optional lineage.

Nothing is bound before every check has passed, and a failure at any step leaves the
store unchanged (the push's own crash safety covers step 4). Long stages report
through a :class:`registry.progress.StageProgress`, so the CLI shows one bar per stage
and a library caller can pass nothing. No torch is imported here (only ``prepare_adapter``
imports it, and only to convert a ``.bin`` when ``allow_pickle`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.progress import StageProgress, single_callback
from registry.storage.manifest import PushResult, Version
from registry.storage.refs import validate_name

if TYPE_CHECKING:
    from registry.formats.fingerprint import BaseFingerprint
    from registry.storage.store import Store


@dataclass(frozen=True)
class AdapterMetadata:
    """What the caller knows about an adapter beyond its files (all optional).

    Attributes:
        base_model: Base model id (default: the config's ``base_model_name_or_path``).
        base_revision: Base model revision (commit).
        base_revision_from_config: Take ``base_revision`` from the config's ``revision``
            when it is not given (the Hub's adapters carry it there).
        fingerprint: A base fingerprint already computed (or a parent's record value);
            ignored when a base directory is given (that one is fingerprinted).
        dataset: Version string, digest or ``{"version", "digest"}``.
        hyperparameters: Training settings (any JSON values).
        metrics: Name -> finite number.
        known_risks: Free-text risk statements.
        license: SPDX id or free text.
        labels: Free-form string -> string labels.
    """

    base_model: str | None = None
    base_revision: str | None = None
    base_revision_from_config: bool = False
    fingerprint: BaseFingerprint | dict[str, Any] | None = None
    dataset: Any = None
    hyperparameters: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    known_risks: list[str] | None = None
    license: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AddResult:
    """Outcome of :func:`add_adapter`.

    Attributes:
        push: The store push (``created`` False when an identical version existed).
        fingerprinted: True when a base directory was fingerprinted on the way.
    """

    push: PushResult
    fingerprinted: bool

    @property
    def version(self) -> Version:
        """The (new or existing) version."""
        return self.push.version

    def to_json(self) -> dict[str, Any]:
        """JSON form: exactly the push's (what ``push --json`` has always printed)."""
        return self.push.to_json()


def add_adapter(store: Store, source_dir: str | Path, name: str, *,
                metadata: AdapterMetadata | None = None, base_dir: str | Path | None = None,
                allow_pickle: bool = False, lineage: dict[str, Any] | None = None,
                actor: str | None = None, workdir_parent: str | Path | None = None,
                progress: StageProgress | None = None) -> AddResult:
    """Validate a PEFT LoRA directory, record it and push it as a version of ``name``.

    Args:
        store: The store to add to.
        source_dir: The adapter directory (``PeftModel.save_pretrained`` output).
        name: Name to bind (checked before any hashing).
        metadata: What goes into the record besides the config and tensors.
        base_dir: Local base model directory: shapes checked, fingerprint recorded.
        allow_pickle: Convert a lone ``adapter_model.bin`` (``weights_only=True``).
        lineage: Lineage to record (``registry.lineage.make_lineage``), e.g. a merge's.
        actor: Audit actor (default ``$ADAPTERS_ACTOR`` or the login name).
        workdir_parent: Where a ``.bin`` conversion works (default: the system temp dir;
            pass a directory on the store's filesystem to avoid a copy).
        progress: One display per stage (``fingerprinting <base>``, ``hashing <dir>``).

    Returns:
        The :class:`AddResult`.

    Raises:
        BadInputError: Bad name, invalid adapter or metadata, bad lineage.
        UnsupportedAdapterError: Not a LoRA adapter.
        BaseMismatchError: The adapter does not fit ``base_dir``.
        NotFoundError: ``source_dir``, ``base_dir`` or a lineage parent is missing.
        OSError: A file cannot be read.
    """
    from registry.formats.fingerprint import fingerprint_model, model_weights
    from registry.ingest import prepare_adapter
    from registry.record import build_record

    validate_name(name)
    meta = metadata or AdapterMetadata()
    stages = progress or single_callback(None)
    source = Path(source_dir)
    with prepare_adapter(source, allow_pickle=allow_pickle, base_dir=base_dir,
                         workdir_parent=workdir_parent) as prepared:
        fingerprint = meta.fingerprint
        if base_dir is not None:
            base = Path(base_dir)
            total = model_weights(base).total_bytes
            with stages(f"fingerprinting {base.name}", total) as advance:
                fingerprint = fingerprint_model(base, progress=advance)
        config = prepared.peft_config
        base_revision = meta.base_revision
        if base_revision is None and meta.base_revision_from_config:
            base_revision = config.get("revision") or None
        record = build_record(
            config, prepared.tensors, base_model=meta.base_model, base_revision=base_revision,
            fingerprint=fingerprint, dataset=meta.dataset,
            hyperparameters=meta.hyperparameters, metrics=meta.metrics,
            known_risks=meta.known_risks, license=meta.license, labels=meta.labels)
        total = sum(p.stat().st_size for p in prepared.files.values() if p.is_file())
        with stages(f"hashing {source.name}", total) as advance:
            pushed = store.push(name, prepared.files, record, lineage=lineage, actor=actor,
                                progress=advance)
    return AddResult(pushed, fingerprinted=base_dir is not None)
