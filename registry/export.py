"""Export a version as a plain PEFT directory with a Hugging Face model card.

The output is exactly the files that were pushed (``adapter_config.json``,
``adapter_model.safetensors``...), each re-verified against its digest while it is
copied, plus a ``README.md`` model card whose YAML front matter carries
``base_model``, ``base_model_relation: adapter``, ``library_name: peft`` and the
license, and whose body lists metrics, known risks, lineage and provenance. So
``PeftModel.from_pretrained(base, out_dir)`` loads it unchanged.

Everything is written into a temp directory ``.<out>.export-XXXXXXXX`` next to
``out_dir`` and renamed into place at the end: an interrupted export never leaves a
half-written ``out_dir``. A failing export removes its own temp directory; one
killed outright (SIGKILL, power cut) cannot, so every export first removes such
temp directories in the same parent that are older than a grace period
(:data:`STALE_EXPORT_GRACE_S`, one hour: a live export refreshes its directory's
mtime with every file it writes). A non-empty existing ``out_dir`` is refused
(:class:`ConflictError`); an ``out_dir`` that is a symbolic link is refused
without following it (:class:`EnvironmentFailure`, exit 6), and so is the system
refusing to write (permission, read-only file system, disk full), naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import (BadInputError, ConflictError, EnvironmentFailure, IntegrityError,
                             environment_error)
from registry.fsutil import check_out_dir, check_outside, STALE_TEMP_GRACE_S, remove_stale_dirs, temp_dir_beside
from registry.progress import ProgressCallback
from registry.storage.manifest import Version
from registry.storage.reader import StoreReader

STALE_EXPORT_GRACE_S = STALE_TEMP_GRACE_S
"""Age (seconds since the last write) after which a left-over export temp dir is removed."""

_TEMP_NAME = re.compile(r"^\..+\.export-[A-Za-z0-9_]+\Z")


def remove_stale_exports(parent: Path, *, grace_s: float = STALE_EXPORT_GRACE_S,
                         now: float | None = None) -> list[Path]:
    """Remove export temp dirs (``.<name>.export-*``) in ``parent`` idle for ``grace_s``
    (:func:`remove_stale_dirs`)."""
    return remove_stale_dirs(parent, _TEMP_NAME, grace_s=grace_s, now=now)


@dataclass(frozen=True)
class ExportResult:
    """Outcome of :func:`export`.

    Attributes:
        path: The written directory.
        version: The exported version.
        files: Relative paths written (including ``README.md``).
    """

    path: Path
    version: Version
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        """JSON form used by ``export --json``."""
        return {"path": str(self.path), "ref": self.version.ref, "files": self.files}


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(version: Version) -> str:
    """The README.md text (YAML front matter + Markdown body) for a version."""
    rec = version.record
    base = rec.get("base_model") or {}
    front = ["---"]
    if base.get("id"):
        front.append(f"base_model: {_yaml_str(base['id'])}")
    front += ["base_model_relation: adapter", "library_name: peft"]
    if rec.get("license"):
        front.append(f"license: {_yaml_str(rec['license'])}")
    front += ["tags:", "- peft", "- lora", "- adapterkit", "---", ""]
    body = [f"# {version.name}", "",
            f"LoRA adapter exported from an adapterkit store as `{version.ref}`.", ""]
    peft = rec.get("peft") or {}
    if peft:
        body += ["## Adapter", "", "| field | value |", "|---|---|"]
        body += [f"| {k} | {_cell(peft[k])} |" for k in sorted(peft) if peft[k] not in (None, {})]
        tensors = rec.get("tensors") or {}
        body += [f"| tensors | {tensors.get('count')} ({_cell(tensors.get('dtypes', {}))}) |",
                 f"| parameters | {tensors.get('parameters')} |", ""]
    body += ["## Base model", "", f"- id: {base.get('id') or 'unknown'}",
             f"- revision: {base.get('revision') or 'unknown'}"]
    fingerprint = base.get("fingerprint") or {}
    if fingerprint:
        body += [f"- struct digest: `{fingerprint.get('struct_digest')}`",
                 f"- weights digest: `{fingerprint.get('weights_digest')}`"]
    body.append("")
    dataset = rec.get("dataset") or {}
    hyper = rec.get("hyperparameters") or {}
    if dataset or hyper:
        body += ["## Training", ""]
        if dataset:
            body.append(f"- dataset: {dataset.get('version') or ''} {dataset.get('digest') or ''}"
                        .rstrip())
        body += [f"- {k}: {_cell(v)}" for k, v in sorted(hyper.items())]
        body.append("")
    metrics = rec.get("metrics") or {}
    body += ["## Metrics", ""]
    body += (["| metric | value |", "|---|---|"] + [f"| {k} | {v:g} |" for k, v in
                                                     sorted(metrics.items())]) if metrics \
        else ["None recorded."]
    body += ["", "## Known risks", ""]
    body += [f"- {risk}" for risk in rec.get("known_risks") or []] or ["None recorded."]
    body += ["", "## Lineage", ""]
    lineage = version.lineage or {}
    if lineage.get("parents") or lineage.get("recipe"):
        for p in lineage.get("parents", []):
            weight = "" if p.get("weight") is None else f", weight {p['weight']:g}"
            body.append(f"- {p.get('ref') or p['digest']} ({p.get('role')}{weight})")
        recipe = lineage.get("recipe") or {}
        if recipe:
            body.append(f"- recipe: {recipe.get('method')} {_cell(recipe.get('parameters', {}))} "
                        f"({recipe.get('tool')} {recipe.get('tool_version')})")
    else:
        body.append("Trained directly (no parents recorded).")
    body += ["", "## Provenance", "", f"- version: `{version.digest}`",
             f"- author: {rec.get('author')}", f"- created: {rec.get('created')}"]
    body += [f"- label {k}: {v}" for k, v in sorted((rec.get("labels") or {}).items())]
    return "\n".join(front + body) + "\n"


def _check_record(version: Version) -> None:
    """The record must be one this store writes: the model card reads its fields.

    Raises:
        IntegrityError: It is not (a manifest written by hand).
    """
    from registry.record import validate_record

    try:
        validate_record(version.record)
    except BadInputError as err:
        raise IntegrityError(f"{version.ref}: its record is not one adapterkit writes "
                             f"({err.message})", fix="treat it as tampering: run `adapters "
                             "verify --all` and restore the store from a backup") from None


def export(store: StoreReader, ref: str | Version, out_dir: Path, *,
           progress: ProgressCallback | None = None,
           stale_grace_s: float = STALE_EXPORT_GRACE_S) -> ExportResult:
    """Write ``ref`` as a plain PEFT directory plus model card into ``out_dir``.

    Args:
        store: The store.
        ref: Ref or version to export.
        out_dir: Target directory; must not exist or be empty, and not be a symlink.
        progress: Called with bytes copied.
        stale_grace_s: Left-over temp dirs of killed exports in ``out_dir``'s parent
            idle this long are removed first (:func:`remove_stale_exports`).

    Raises:
        ConflictError: ``out_dir`` exists and is not an empty directory.
        EnvironmentFailure: ``out_dir`` is a symbolic link, or the system refused a
            write (permission, read-only file system, disk full); nothing is left.
        BadInputError: The version has no files (a model recorded by reference).
        IntegrityError: A blob is missing or corrupt.
        NotFoundError: Unknown ref.
    """
    version = ref if isinstance(ref, Version) else store.resolve(ref)
    _check_record(version)
    if not version.files:
        raise BadInputError(f"{version.ref} has no stored files to export",
                            fix="derived models are recorded by reference; see record.location")
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise EnvironmentFailure(f"export target {out_dir} is a symbolic link; it is not followed",
                                 fix="export into a real new or empty directory")
    check_out_dir(out_dir, fix="export into a new or empty directory")
    check_outside(out_dir, store.root)
    remove_stale_exports(out_dir.parent, grace_s=stale_grace_s)
    tmp = temp_dir_beside(out_dir, prefix=f".{out_dir.name}.export-")
    try:
        _fill(store, version, tmp, out_dir, progress)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted({e["path"] for e in version.files} | {"README.md"})
    return ExportResult(out_dir, version, files)


def _fill(store: StoreReader, version: Version, tmp: Path, out_dir: Path,
          progress: ProgressCallback | None) -> None:
    """Write the version's files and model card into ``tmp`` (the temp dir of ``out_dir``).

    Raises:
        EnvironmentFailure: The system refused a write (disk full, I/O error...).
        IntegrityError: A blob is missing or corrupt.
    """
    try:
        store.materialize(version, tmp, progress=progress)  # type: ignore[attr-defined]
        (tmp / "README.md").write_text(model_card(version), encoding="utf-8")
        os.chmod(tmp / "README.md", 0o644)  # whatever the umask, like the files
        os.chmod(tmp, 0o755)
    except OSError as err:
        raise environment_error(err, path=err.filename or tmp.parent,
                                action=f"exporting to {out_dir}") from err


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir to ``out_dir`` (an empty ``out_dir`` is replaced).

    Raises:
        ConflictError: ``out_dir`` appeared (non-empty) meanwhile.
        EnvironmentFailure: ``out_dir`` became a symbolic link or the rename failed.
    """
    if out_dir.is_symlink():
        raise EnvironmentFailure(f"export target {out_dir} is a symbolic link; it is not followed",
                                 fix="export into a real new or empty directory")
    try:
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ConflictError(f"could not move the export into {out_dir}: it is not empty",
                                fix="export into a new or empty directory") from err
        raise environment_error(err, path=out_dir, action="exporting") from err
