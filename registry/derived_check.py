"""What a model directory is: per-tensor digests of derived models, and the build environment.

A derived model (an ``unload`` / ``quantize`` output) is recorded *by reference*: the
store keeps its record, not its weights. The record's ``weights.weights_digest`` is
:func:`registry.formats.fingerprint.fingerprint_model`'s, defined as the sha256 of the
canonical JSON ``{"v": 1, "tensors": [[name, dtype, shape, sha256 hex], ...]}`` sorted
by name. When a derived model is recorded, that very JSON document (the *tensor
list*) is stored as a blob (:func:`tensor_list_bytes`), so the blob's digest **is** the
weights digest: nothing has to point at it, and whoever holds the record can fetch
the list by the digest it already trusts and re-hash it.

:func:`check_model_dir` (``adapters verify REF --model DIR``, the gate's ``--model``,
``adapters rebuild``) hashes a directory's tensors (file layout and order do not
matter) and compares the result with the record: equal digests are a bit-for-bit
match; otherwise the tensor list names the first tensor that is missing, extra, of
another dtype/shape or other bytes (:func:`first_difference`). Without the blob (a
store that lost it) the mismatch is still reported, only without the tensor's name.

:func:`environment` lists what a rebuild must share with the original run to be
bit-identical (adapterkit, Python, torch, transformers, bitsandbytes, safetensors,
machine); :func:`environment_diff` names what differs. Versions come from package
metadata, so nothing heavy is imported. No torch here.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import __version__
from registry.digests import canonical_json, is_digest, sha256_digest
from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.progress import ProgressCallback
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.manifest import Version
    from registry.storage.reader import StoreReader

PACKAGES = ("torch", "transformers", "bitsandbytes", "safetensors")
"""Libraries whose versions a bit-identical rebuild depends on."""
Entry = list[Any]  # [name, dtype, shape (list), sha256 hex]


def environment() -> dict[str, str | None]:
    """Versions of what produced a derived model (``None``: not installed)."""
    env: dict[str, str | None] = {"adapterkit": __version__,
                                  "python": platform.python_version(),
                                  "machine": platform.machine()}
    for package in PACKAGES:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    return env


def environment_diff(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``["torch 2.6.0 (recorded 2.5.1)", ...]`` for every recorded key whose value differs."""
    out = []
    for key, was in sorted((recorded or {}).items()):
        now = current.get(key)
        if key in current and now != was:
            out.append(f"{key} {now} (recorded {was})")
    return out


def tensor_list_bytes(entries: Sequence[Entry]) -> bytes:
    """The canonical tensor list; its sha256 is the weights digest."""
    rows = sorted([str(n), str(d), [int(x) for x in s], str(h)] for n, d, s, h in entries)
    return canonical_json({"v": 1, "tensors": rows})


def model_tensor_list(model_dir: str | Path, *, progress: ProgressCallback | None = None
                      ) -> list[Entry]:
    """``[[name, dtype, shape, sha256 hex], ...]`` of a model directory, sorted by name.

    Raises:
        NotFoundError: The directory or a shard is missing.
        BadInputError: No safetensors weights, malformed headers or index.
    """
    from registry.formats.fingerprint import hash_tensors, model_weights

    found = model_weights(model_dir)
    hashes: dict[str, str] = {}
    for path, header in found.files.items():
        hashes.update(hash_tensors(path, header, progress=progress))
    rows = []
    for name, path in found.locations.items():
        info = found.files[path].tensors[name]
        rows.append([name, info.dtype, list(info.shape), hashes[name]])
    return sorted(rows)


CONFIG_NAME = "config.json"
VOLATILE_CONFIG_KEYS = ("transformers_version",)
"""Keys of ``config.json`` left out of its digest: what wrote it, not what it says."""


def config_digest(model_dir: str | Path) -> str | None:
    """The digest of a model directory's ``config.json`` as parsed (canonical JSON, less
    :data:`VOLATILE_CONFIG_KEYS`), None when there is none.

    The weights digest says nothing about the architecture, so a record binds this too:
    an edited ``rms_norm_eps`` or ``hidden_act`` beside the recorded weights is another
    model, and :func:`check_model_dir` says so.

    Raises:
        BadInputError: ``config.json`` is not a JSON object.
    """
    from registry.formats.strict_json import load_json_file

    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    config = load_json_file(path, CONFIG_NAME, max_bytes=1 << 20)
    if not isinstance(config, dict):
        raise BadInputError(f"{path} is not a JSON object", fix="re-save the model with save_pretrained")
    return sha256_digest(canonical_json({k: v for k, v in config.items()
                                         if k not in VOLATILE_CONFIG_KEYS}))


def check_model_config(version: Version, model_dir: str | Path) -> None:
    """``model_dir``'s ``config.json`` is the one ``version`` records (records made before
    this check existed name none, and pass).

    Raises:
        IntegrityError: It differs, or is missing while the record names one.
        BadInputError: It is not a JSON object.
    """
    want = version.record.get("config")
    if want is None:
        return
    got = config_digest(model_dir)
    if got != want:
        what = "is missing" if got is None else f"differs (digest {got[:19]}.. != recorded {want[:19]}..)"
        raise IntegrityError(f"{Path(model_dir) / CONFIG_NAME} of {version.ref} {what}: the "
                             "architecture is not the recorded one",
                             fix=f"redeploy it from a verified copy, or rebuild it: `adapters "
                                 f"rebuild {version.ref} --base BASE_DIR --out NEW_DIR`")


def recorded_tensor_list(store: StoreReader, weights_digest: str) -> list[Entry] | None:
    """The tensor list stored under ``weights_digest``, or None when the store lacks it.

    Raises:
        IntegrityError: The blob does not hash to ``weights_digest`` or does not parse.
    """
    if not is_digest(weights_digest):
        return None
    try:
        with store.blobs.open(weights_digest) as handle:
            data = handle.read(1 << 28)
    except (NotFoundError, FileNotFoundError, BadInputError):
        return None
    if sha256_digest(data) != weights_digest:
        raise IntegrityError(f"the tensor list blob {weights_digest[:19]}.. is corrupt",
                             fix="run `adapters verify --all`; restore the blob from a copy")
    try:
        rows = loads_json(data)["tensors"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"the tensor list blob {weights_digest[:19]}.. does not parse",
                             fix="run `adapters verify --all`") from None
    return [list(r) for r in rows]


def first_difference(recorded: Sequence[Entry], actual: Sequence[Entry]) -> tuple[str, str]:
    """``(tensor, what differs)`` for the first tensor (by name) the two lists disagree on."""
    want = {r[0]: r for r in recorded}
    got = {r[0]: r for r in actual}
    for name in sorted(set(want) | set(got)):
        w, g = want.get(name), got.get(name)
        if w is None:
            return name, "is not in the recorded model (extra tensor)"
        if g is None:
            return name, "is missing"
        if w[1] != g[1] or list(w[2]) != list(g[2]):
            return name, f"is {g[1]} {list(g[2])}, recorded {w[1]} {list(w[2])}"
        if w[3] != g[3]:
            return name, f"has other bytes (sha256 {g[3][:12]}.., recorded {w[3][:12]}..)"
    return "", "the tensor lists agree but the digests differ"


@dataclass(frozen=True)
class ModelCheck:
    """Outcome of :func:`check_model_dir` (only returned when the directory matches)."""

    ref: str
    model_dir: str
    weights_digest: str
    tensors: int

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, **self.__dict__}


def recorded_weights(version: Version) -> str:
    """The weights digest a derived model's record names.

    Raises:
        BadInputError: ``version`` is not a derived model (kind ``model``).
    """
    weights = (version.record.get("weights") or {}).get("weights_digest")
    if version.kind != "model" or not is_digest(weights):
        raise BadInputError(f"{version.ref} is an {version.kind}, not a derived model recorded "
                            "by reference", fix="--model and `rebuild` take unload/quantize "
                            "outputs; `adapters verify REF` checks an adapter's stored files")
    return weights


def check_model_dir(store: StoreReader, version: Version, model_dir: str | Path, *,
                    progress: ProgressCallback | None = None,
                    actual: Sequence[Entry] | None = None) -> ModelCheck:
    """Check that ``model_dir`` holds exactly the weights ``version`` records, and its
    ``config.json`` (:func:`check_model_config`).

    Args:
        store: The registry (for the recorded tensor list).
        version: A derived model version.
        model_dir: The deployed (or rebuilt) directory.
        progress: Called with bytes hashed.
        actual: The directory's tensor list, if already computed.

    Returns:
        The :class:`ModelCheck` when every tensor matches bit for bit.

    Raises:
        IntegrityError: A tensor is missing, extra or differs (named when the store has
            the recorded tensor list), or ``config.json`` is not the recorded one.
        BadInputError: ``version`` is not a derived model, or the directory holds no
            readable safetensors weights.
        NotFoundError: The directory does not exist.
    """
    want = recorded_weights(version)
    rows = list(actual) if actual is not None else model_tensor_list(model_dir, progress=progress)
    got = sha256_digest(tensor_list_bytes(rows))
    if got == want:
        check_model_config(version, model_dir)
        return ModelCheck(ref=version.ref, model_dir=str(model_dir), weights_digest=want,
                          tensors=len(rows))
    recorded = recorded_tensor_list(store, want)
    if recorded is None:
        detail = "(per-tensor digests not in the store, so the tensor cannot be named)"
    else:
        tensor, what = first_difference(recorded, rows)
        detail = f"tensor {tensor} {what}"
    raise IntegrityError(f"{model_dir} is not {version.ref}: weights digest {got[:19]}.. != "
                         f"recorded {want[:19]}..; {detail}",
                         fix=f"redeploy it from a verified copy, or rebuild it: `adapters "
                             f"rebuild {version.ref} --base BASE_DIR --out NEW_DIR`")
