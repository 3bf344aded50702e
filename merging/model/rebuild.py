"""Rebuild a derived model from its recorded recipe and prove it bit for bit.

Derived models (unload / quantize outputs) are recorded by reference: the store holds
their record and lineage, not their weights. :func:`rebuild` re-runs the recipe and
checks the output against the record, so a registry can prove what a directory is
without storing it.

**The plan** (:func:`plan`) walks the lineage from the requested version back to the
base: a ``quantize`` step's input is its ``source`` parent (a stored model, e.g. an
unloaded merge; older records call it ``base``), rebuilt first when that is itself a
derived model; an ``unload`` step's input is the base (``--base``) and its adapter
the ``adapter`` parent, materialized from the store. So an nf4 model of an unloaded
merge is *unload, then quantize*, and ``unload --quantize nf4`` is one unload step
with quantization, as it was made.

**Each step** calls :func:`merging.model.execute.rewrite_model` with the recorded
parameters (quantization and QLoRA specs, ``max_shard_size``, the merge arithmetic
used for bfloat16 weights) and the step's recorded base fingerprint as ``expected``:
the input's bytes are verified while they stream (a wrong ``--base`` is refused,
exit 2) and the output is hashed while written. The output's weights digest must
equal the record's; otherwise :func:`registry.derived_check.check_model_dir` names
the first differing tensor (exit 3), and the message lists which recorded library
versions differ from this machine's (:func:`registry.derived_check.environment_diff`).

**Output.** Everything is built in a scratch directory next to ``--out``
(``.<out>.rebuild-*``), intermediate steps unsynced, and the final directory is
renamed onto ``--out`` only after it matched; a mismatch, an error or an interrupt
removes the scratch directory, so ``--out`` is either absent or a proven rebuild. A
non-empty ``--out`` is refused before anything runs (exit 4).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.derived_check import (check_model_dir, environment_diff, model_tensor_list,
                                    recorded_weights)
from registry.errors import BadInputError, ConflictError, IntegrityError, NotFoundError
from registry.fsutil import remove_stale_dirs, temp_dir_beside
from registry.progress import ProgressCallback

if TYPE_CHECKING:
    from merging.model.bnb import QuantSpec
    from merging.model.results import UnloadResult
    from registry.storage.manifest import Version
    from registry.storage.store import Store

METHODS = ("unload", "quantize")
SOURCE_ROLES = ("source", "base")
"""Roles of a quantize step's input parent (``base`` in records made before ``source``)."""


@dataclass(frozen=True)
class Step:
    """One recorded run to replay: the version it made and its inputs."""

    version: Version
    method: str
    parameters: dict[str, Any]
    adapter: Version | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.version.ref, "method": self.method,
                "adapter": self.adapter.ref if self.adapter is not None else None}


@dataclass(frozen=True)
class RebuildResult:
    """A rebuild that matched its record bit for bit."""

    ref: str
    out_dir: str
    weights_digest: str
    tensors: int
    steps: tuple[Step, ...]
    environment_differences: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "ref": self.ref, "out_dir": self.out_dir,
                "weights_digest": self.weights_digest, "tensors": self.tensors,
                "steps": [s.to_json() for s in self.steps],
                "environment_differences": list(self.environment_differences)}


def _recipe(version: Version) -> tuple[str, dict[str, Any]]:
    recipe = (version.lineage or {}).get("recipe") or {}
    method = recipe.get("method")
    if version.kind != "model" or method not in METHODS:
        raise BadInputError(f"{version.ref} was not made by unload or quantize "
                            f"(kind {version.kind}, method {method}); nothing to rebuild",
                            fix="rebuild a derived model (an unload or quantize output)")
    return method, dict(recipe.get("parameters") or {})


def _parent(store: Store, version: Version, roles: tuple[str, ...]) -> Version | None:
    for entry in (version.lineage or {}).get("parents") or []:
        if entry.get("role") in roles:
            try:
                return store.version_by_digest(entry["digest"])
            except NotFoundError:
                raise NotFoundError(f"{entry.get('ref') or entry['digest']} ({entry['role']} of "
                                    f"{version.ref}) is no longer in the store",
                                    fix="push it again (same files give the same digest)") from None
    return None


def plan(store: Store, version: Version) -> list[Step]:
    """The runs that made ``version``, oldest first (see the module docstring).

    Raises:
        BadInputError: ``version`` (or a step's input) was not made by unload/quantize,
            or an unload's adapter was a directory rather than a stored version.
        NotFoundError: A recorded input is no longer in the store.
    """
    steps: list[Step] = []
    current: Version | None = version
    while current is not None:
        method, params = _recipe(current)
        if method == "unload":
            adapter = _parent(store, current, ("adapter",))
            if adapter is None:
                raise BadInputError(f"{current.ref} was unloaded from an adapter directory, "
                                    "not a stored version: its input cannot be replayed",
                                    fix="push the adapter and unload it by ref")
            steps.insert(0, Step(current, method, params, adapter))
            break
        steps.insert(0, Step(current, method, params))
        source = _parent(store, current, SOURCE_ROLES)
        derived = source is not None and source.kind == "model" and \
            ((source.lineage or {}).get("recipe") or {}).get("method") in METHODS
        current = source if derived else None
    return steps


def _spec(data: dict[str, Any] | None) -> QuantSpec | None:
    from merging.model.bnb import QuantSpec

    if not data:
        return None
    # bitsandbytes' bytes depend on where it ran: replay on the recorded device (a model
    # quantized on CUDA needs CUDA to rebuild; resolve_device says so with exit 2)
    device = str(data.get("device") or "cpu")
    if device != "cpu":
        from merging.devices import resolve_device

        device = str(resolve_device(device))
    return QuantSpec(data["method"], bool(data.get("double_quant")), data.get("blocksize") or 64,
                     data.get("compute_dtype"), tuple(data.get("skip_modules") or ()), device=device)


@contextlib.contextmanager
def _bf16_gemm(value: Any) -> Iterator[None]:
    """Replay the recorded merge arithmetic for bfloat16 weights."""
    from merging.model import rowmerge

    old = rowmerge.BF16_GEMM
    if isinstance(value, bool):
        rowmerge.BF16_GEMM = value
    try:
        yield
    finally:
        rowmerge.BF16_GEMM = old


def _run_step(store: Store, step: Step, src: Path, dest: Path, scratch: Path, *,
              progress: ProgressCallback | None, sync: bool) -> UnloadResult:
    from merging.adapter import load_adapter
    from merging.model.execute import rewrite_model

    params = step.parameters
    loaded = None
    if step.adapter is not None:
        loaded = load_adapter(store.materialize(step.adapter, scratch / f"adapter-{dest.name}"))
    expected = (step.version.record.get("base_model") or {}).get("fingerprint")
    try:
        with _bf16_gemm(params.get("bf16_gemm")):
            return rewrite_model(src, dest, adapter=loaded, quant=_spec(params.get("quantization")),
                                 qlora=_spec(params.get("qlora")),
                                 max_shard_size=params.get("max_shard_size"), expected=expected,
                                 probe=False, store=None, progress=progress, sync=sync)
    finally:
        if loaded is not None:
            loaded.close()


def _check_step(store: Store, step: Step, dest: Path, result: UnloadResult, diffs: list[str]) -> int:
    """Raise unless ``dest`` is bit for bit what ``step.version`` records; tensor count."""
    want = recorded_weights(step.version)
    got = (result.output_fingerprint or {}).get("weights_digest")
    if got == want:
        return int(result.tensors)
    try:
        check_model_dir(store, step.version, dest, actual=model_tensor_list(dest))
    except IntegrityError as err:
        env = f"; differs from the recorded environment: {', '.join(diffs)}" if diffs else \
            "; same library versions as recorded"
        raise IntegrityError(f"rebuild of {step.version.ref} is not bit-identical: "
                             f"{err.message.split('; ', 1)[-1]}{env}",
                             fix="rebuild with the recorded versions (`adapters show REF "
                                 "--json`, lineage.report.environment)") from None
    return int(result.tensors)  # pragma: no cover - digests differ but the tensors agree


def _check_out(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConflictError(f"{out_dir} exists and is not a directory",
                            fix="pass a new or empty directory as --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConflictError(f"{out_dir} is not empty; a rebuild never writes over files",
                            fix="pass a new or empty directory as --out")


def rebuild(store: Store, ref: str, base_dir: str | Path, out_dir: str | Path, *,
            progress: ProgressCallback | None = None, sync: bool = True) -> RebuildResult:
    """Re-run the recipe of derived model ``ref`` on ``base_dir`` into ``out_dir``.

    Args:
        store: The registry holding the version, its lineage and its adapter(s).
        ref: A derived model (unload or quantize output).
        base_dir: The base model the first step (or the quantized source) was made from.
        out_dir: Where the rebuilt model goes (new or empty).
        progress: Called with input bytes processed (every step).
        sync: fsync the published output.

    Returns:
        The :class:`RebuildResult` (only when every step matched its record).

    Raises:
        ConflictError: ``out_dir`` exists and is not empty.
        IntegrityError: A step's output differs from its record (names the tensor).
        BaseMismatchError: ``base_dir`` is not the recorded input.
        BadInputError: ``ref`` is not a derived model or cannot be replayed.
        NotFoundError: Unknown ref, or a recorded input is no longer in the store.
    """
    from merging.model.derived import build_environment

    version = store.resolve(ref)
    recorded_weights(version)
    out_dir = Path(out_dir).absolute()
    _check_out(out_dir)
    base = Path(base_dir)
    if not base.is_dir():
        raise NotFoundError(f"base model directory {base} not found",
                            fix="pass --base with the model the recipe started from")
    steps = plan(store, version)
    current = build_environment()
    diffs = sorted({d for s in steps for d in environment_diff(
        ((s.version.lineage or {}).get("report") or {}).get("environment"), current)})
    # what a killed rebuild into the same OUT left (mkdtemp's 8 characters), once idle
    remove_stale_dirs(out_dir.parent, re.compile(re.escape(f".{out_dir.name}.rebuild-") + r"[a-z0-9_]{8}\Z"))
    scratch = temp_dir_beside(out_dir, prefix=f".{out_dir.name}.rebuild-")
    try:
        src, tensors = base, 0
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            dest = scratch / ("model" if last else f"step-{i}")
            result = _run_step(store, step, src, dest, scratch, progress=progress,
                               sync=sync and last)
            tensors = _check_step(store, step, dest, result, diffs)
            src = dest
        _check_out(out_dir)
        try:
            os.rename(src, out_dir)  # onto a missing or empty directory
        except OSError as err:
            if not out_dir.exists():
                raise
            raise ConflictError(f"{out_dir} was filled while rebuilding; nothing written",
                                fix="pass a new or empty directory as --out") from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RebuildResult(ref=version.ref, out_dir=str(out_dir),
                         weights_digest=recorded_weights(version), tensors=tensors,
                         steps=tuple(steps), environment_differences=tuple(diffs))
