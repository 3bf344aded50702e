"""Hugging Face Hub interop: pull an adapter repo into the store, push a version out.

**Pull** (:func:`pull`). ``hf://org/name[@revision]`` is parsed strictly
(:func:`registry.interop.hub_refs.parse_hub_ref`): a model repo id of exactly two segments and an optional
branch, tag or commit. ``huggingface_hub.snapshot_download`` fetches only the PEFT
files (``adapter_config.json``, ``adapter_model.safetensors``/``.bin``,
``README.md``) into the standard HF cache, so the same call works offline
(``HF_HUB_OFFLINE=1``, then with ``local_files_only=True``: see :func:`hub_offline`)
from a cache filled earlier, by ``hf download`` or by hand in the documented layout
(``models--org--name/{blobs,snapshots/<commit>,refs}``).
The snapshot's files (symlinks into the cache's ``blobs/``, each checked to stay
inside the repo's cache folder) are staged as regular files in the store's
``tmp/`` (hard links when possible) and go through the only door for adapter
bytes, :func:`registry.ingest.prepare_adapter` (optionally checked against and
fingerprinted with a local base model), and :meth:`Store.push`. The record's base
model id comes from ``base_model_name_or_path`` (its revision from the config's
``revision``); where it came from is kept in string labels ``hub_repo``,
``hub_revision`` (what was asked for, default ``main``) and ``hub_commit`` (the
40-hex commit the snapshot folder is named after), so the version says exactly
which Hub commit it is. Identical re-pulls deduplicate to the same version.

**Push** (:func:`push_to_hub`). The version is exported with
:func:`registry.export.export` (the stored files, re-verified, plus a model card
with ``base_model``, ``base_model_relation: adapter``, ``library_name: peft``)
into a temporary directory, then ``create_repo(exist_ok=True)``, ``create_branch``
(for a non-default ``revision``) and ``upload_folder`` make one Hub commit. The
Hub client is a parameter (default ``HfApi(token=...)``) so tests and other
backends can pass any object with those three methods.

huggingface_hub is imported inside the functions only. Its exceptions are mapped
by :func:`registry.interop.hub_refs.hub_error` to :mod:`registry.errors` classes with a fix: a repo, revision
or offline cache miss -> :class:`NotFoundError` (5); authentication, offline mode
and unreachable Hub -> :class:`BadInputError` (2).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import AdapterkitError, BadInputError
from registry.fsutil import leased_temp_dir
from registry.interop.hub_refs import HubRef, check_branch, hub_error, parse_hub_ref, parse_repo_id
from registry.progress import ProgressCallback, single_callback
from registry.storage.manifest import PushResult, Version

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader
    from registry.storage.store import Store

ALLOW_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                  "README.md")
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}\Z")
@dataclass(frozen=True)
class HubSnapshot:
    """A downloaded (or cached) snapshot of a Hub repo.

    Attributes:
        ref: What was asked for.
        commit: The 40-hex commit the snapshot belongs to.
        path: The snapshot directory (inside the HF cache).
    """

    ref: HubRef
    commit: str
    path: Path

    def labels(self) -> dict[str, str]:
        """The record labels that say where a pulled version came from."""
        return {"hub_repo": self.ref.repo_id,
                "hub_revision": self.ref.revision or DEFAULT_REVISION,
                "hub_commit": self.commit}


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE``, read once at its import).

    Offline pulls pass ``local_files_only=True`` rather than relying on
    ``snapshot_download``'s own offline fallback: in huggingface_hub 1.x up to at
    least 1.33 that fallback is skipped for a 40-hex commit revision, which then
    needs the per-commit tree listing (``trees/<commit>.json``, written only by
    1.x downloads) and otherwise fails with ``OfflineModeIsEnabled`` although the
    snapshot folder is cached. ``local_files_only`` looks up ``refs/`` and
    ``snapshots/`` directly in every version from 0.25 on.
    """
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download_snapshot(ref: HubRef | str, *, cache_dir: str | Path | None = None,
                      token: str | None = None) -> HubSnapshot:
    """Fetch the PEFT files of ``ref`` with ``snapshot_download`` (offline: from the cache).

    Args:
        ref: ``hf://`` text or a parsed :class:`HubRef`.
        cache_dir: HF cache directory (default: ``$HF_HUB_CACHE`` as huggingface_hub reads it).
        token: Hub token (default: huggingface_hub's stored login / ``$HF_TOKEN``).

    Raises:
        BadInputError: Bad ref, authentication failure, Hub unreachable.
        NotFoundError: Unknown repo or revision, or offline and not cached.
    """
    from huggingface_hub import snapshot_download

    parsed = parse_hub_ref(ref) if isinstance(ref, str) else ref
    try:
        folder = snapshot_download(parsed.repo_id, revision=parsed.revision, cache_dir=cache_dir,
                                   token=token, allow_patterns=list(ALLOW_PATTERNS),
                                   local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a registry error
        raise hub_error(exc, parsed.uri) from exc
    path = Path(folder)  # <cache>/models--org--name/snapshots/<commit>
    if not _COMMIT.match(path.name):
        raise BadInputError(f"{parsed.uri}: cannot tell the commit of snapshot {path}",
                            fix="pull an explicit commit: hf://org/name@<40-hex sha>")
    return HubSnapshot(parsed, path.name, path)


@dataclass(frozen=True)
class PullResult:
    """Outcome of :func:`pull`.

    Attributes:
        push: The store push (``created`` False when the version already existed).
        snapshot: Where the files came from.
    """

    push: PushResult
    snapshot: HubSnapshot

    def to_json(self) -> dict[str, Any]:
        """JSON form used by ``pull --json``."""
        return {**self.push.to_json(),
                "hub": {"uri": self.snapshot.ref.uri, **self.snapshot.labels()}}


def pull(store: Store, ref: HubRef | str, *, name: str | None = None,
         base_dir: str | Path | None = None, allow_pickle: bool = False,
         cache_dir: str | Path | None = None, token: str | None = None,
         labels: dict[str, str] | None = None, actor: str | None = None,
         progress: ProgressCallback | None = None) -> PullResult:
    """Import a Hub adapter repo as a version (see the module docstring).

    Args:
        store: An open :class:`registry.storage.store.Store`.
        ref: ``hf://org/name[@revision]`` or a :class:`HubRef`.
        name: Store name (default: the repo id ``org/name``).
        base_dir: Local base model directory: shapes checked, fingerprint recorded.
        allow_pickle: Convert a lone ``adapter_model.bin`` (``torch.load(weights_only=True)``).
        cache_dir: HF cache directory (default: huggingface_hub's).
        token: Hub token.
        labels: Extra labels; the ``hub_*`` labels win on a clash.
        actor: Audit actor (default ``$ADAPTERS_ACTOR`` or the login).
        progress: Called with the bytes fingerprinted and hashed.

    Raises:
        BadInputError: Bad ref or name, invalid adapter, auth or network failure.
        UnsupportedAdapterError: Not a LoRA adapter.
        BaseMismatchError: The adapter does not fit ``base_dir``.
        NotFoundError: Unknown repo/revision, or offline and not cached; missing ``base_dir``.
    """
    from registry.add import AdapterMetadata, add_adapter
    from registry.storage.refs import validate_name

    parsed = parse_hub_ref(ref) if isinstance(ref, str) else ref
    target = name or parsed.repo_id
    validate_name(target)
    snapshot = download_snapshot(parsed, cache_dir=cache_dir, token=token)
    tmp = store.root / "tmp"
    workspace = (leased_temp_dir(tmp, "hub-pull-") if tmp.is_dir()  # gc leaves it alone
                 else tempfile.TemporaryDirectory(prefix="hub-pull-"))
    with workspace as staged:
        staging = Path(staged)
        stage_snapshot(snapshot.path, staging)
        metadata = AdapterMetadata(base_revision_from_config=True,
                                   labels={**(labels or {}), **snapshot.labels()})
        added = add_adapter(store, staging, target, metadata=metadata, base_dir=base_dir,
                            allow_pickle=allow_pickle, actor=actor, workdir_parent=staging,
                            progress=single_callback(progress))
    return PullResult(added.push, snapshot)


def stage_snapshot(snapshot: Path, dest: Path) -> list[str]:
    """Copy the PEFT files of an HF cache snapshot into ``dest`` as regular files.

    In the cache, ``snapshots/<commit>/<file>`` is a symlink to ``../../blobs/<id>``,
    which :func:`registry.ingest.prepare_adapter` rightly refuses (it points outside
    the directory). Each link must resolve to a regular file inside the repo's own
    cache folder (``models--org--name``); it is then hard-linked into ``dest`` (copied
    across filesystems). Other files in the snapshot are ignored.

    Returns:
        The file names staged.

    Raises:
        BadInputError: A link is broken or resolves outside the repo's cache folder.
    """
    # the repo folder as the cache names it: a snapshot folder that is itself a link
    # elsewhere must not widen what counts as "inside"
    repo_folder = snapshot.parent.parent.resolve()
    staged = []
    for name in ALLOW_PATTERNS:
        src = snapshot / name
        if not src.is_symlink() and not src.exists():
            continue
        try:
            real = src.resolve(strict=True)
            real.relative_to(repo_folder)
        except (OSError, RuntimeError, ValueError):
            raise BadInputError(f"{src}: broken link or outside the cache folder {repo_folder}",
                                fix="delete that repo from the HF cache (`hf cache delete`) "
                                "and download it again") from None
        if not real.is_file():
            raise BadInputError(f"{src}: not a regular file",
                                fix="delete that repo from the HF cache and download it again")
        try:
            os.link(real, dest / name)
        except OSError:
            shutil.copyfile(real, dest / name)
        staged.append(name)
    return staged


@dataclass(frozen=True)
class HubPushResult:
    """Outcome of :func:`push_to_hub`.

    Attributes:
        version: The version uploaded.
        repo_id, revision: Target repo and branch (None: the default branch).
        commit, commit_url, repo_url: What the Hub returned (may be empty strings).
        files: Paths uploaded (including ``README.md``).
    """

    version: Version
    repo_id: str
    revision: str | None
    commit: str
    commit_url: str
    repo_url: str
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        """JSON form used by ``push-hub --json``."""
        return {"ref": self.version.ref, "digest": self.version.digest, "repo_id": self.repo_id,
                "revision": self.revision or DEFAULT_REVISION, "commit": self.commit,
                "commit_url": self.commit_url, "repo_url": self.repo_url, "files": self.files}


def push_to_hub(store: StoreReader, ref: str | Version, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None,
                token: str | None = None, api: Any = None) -> HubPushResult:
    """Upload a version as a PEFT directory plus model card in one Hub commit.

    Args:
        store: An open store.
        ref: The version to upload.
        repo_id: ``org/name`` (created if missing).
        private: Create the repo private (an existing repo keeps its visibility).
        revision: Branch to commit to (created from the default branch if missing).
        commit_message: Default ``Upload <ref> with adapterkit``.
        token: Hub token for the default client.
        api: Object with ``create_repo``, ``create_branch`` and ``upload_folder`` like
            ``huggingface_hub.HfApi`` (default ``HfApi(token=token)``).

    Raises:
        BadInputError: Bad repo id or revision, a version without files, auth,
            offline mode or network failure.
        NotFoundError: Unknown ref; the Hub says the repo or revision does not exist.
        IntegrityError: A stored blob is missing or corrupt.
    """
    from registry.export import export

    repo_id = parse_repo_id(repo_id)
    check_branch(revision)
    version = ref if isinstance(ref, Version) else store.resolve(ref)
    what = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="adapterkit-hub-") as tmp:
        exported = export(store, version, Path(tmp) / "export")
        message = commit_message or f"Upload {version.ref} with adapterkit"
        try:
            repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(exported.path),
                                     repo_type="model", revision=revision,
                                     commit_message=message,
                                     commit_description=f"adapterkit version {version.digest}")
        except AdapterkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a registry error
            raise hub_error(exc, what) from exc
    return HubPushResult(version, repo_id, revision, str(getattr(info, "oid", "") or ""),
                         str(getattr(info, "commit_url", "") or ""), str(repo_url or ""),
                         exported.files)
