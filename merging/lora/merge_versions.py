"""The ``adapters merge`` use case: merge stored versions into a new stored version.

One call does the whole flow, so the command only parses its options
(:meth:`MergeRequest.parse`), calls :func:`merge_versions` and renders the
:class:`MergeReport`:

1. resolve every input ref; the output name (default ``<first input>-<method>``, plus
   ``-<align>`` when aligned) is validated before any work;
2. check the method's parameters (:meth:`merging.lora.methods.MergeMethod.resolve`) and
   the inputs' recorded base fingerprints (:func:`merging.lora.inputs.check_bases`;
   ``allow_base_mismatch`` accepts the same structure with other weights, as a warning);
3. materialize the inputs into a scratch directory under the store's ``tmp/`` (removed
   afterwards, also on error) and merge them (:func:`merging.lora.engine.merge_adapters`)
   under one progress bar counting modules;
4. push through the one push path of every merge (:func:`merging.lora.publish.push_merge`:
   re-validated with the ingest checks, lineage with parents, recipe and report), then,
   with ``out_dir``, also write the PEFT directory there (atomically).

The order of the checks is the command's (exit codes and which error wins are part of
its behaviour). torch is imported by the engine, which this module imports inside
:func:`merge_versions` only: building a :class:`MergeRequest` needs no torch.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merging.lora.options import Rank, parse_rank, parse_weights
from registry.errors import BadInputError

if TYPE_CHECKING:
    from merging.adapter import LoraAdapter
    from registry.storage.manifest import PushResult, Version
    from registry.storage.store import Store

Advance = Callable[[int], None]
"""Called with the number of modules just merged."""
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]
"""``(description, total modules)`` -> a context manager yielding an :data:`Advance`
(``functools.partial(cli.output.Output.progress, unit="modules")`` fits)."""


@dataclass(frozen=True)
class MergeRequest:
    """What to merge, checked as far as possible without a store.

    Attributes:
        refs: Two or more input refs, in order (the first names the output by default).
        method: A registered merge method (:data:`merging.lora.methods.METHODS`).
        weights: One weight per input, or None (1.0 each).
        params: The method parameters chosen explicitly (``density``, ``lambda``,
            ``normalize``, ``sign_election``, ``gamma``, ``epsilon``, ``align``).
        rank: Output rank (:data:`merging.lora.options.Rank`).
        seed: Seed of DARE/DELLA masks and SVD sketches.
        name: Output name (default ``<first input name>-<method>[-<align>]``).
        out_dir: Also write the merged PEFT directory here.
        allow_base_mismatch: Accept inputs whose bases share structure but not weights.
        device: Where to compute (``cpu``, ``cuda``, ``cuda:N``, ``auto``;
            :func:`merging.devices.resolve_device`, checked before any work).
    """

    refs: tuple[str, ...]
    method: str = "ties"
    weights: tuple[float, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    rank: Rank = None
    seed: int = 0
    name: str | None = None
    out_dir: Path | None = None
    allow_base_mismatch: bool = False
    device: str = "cpu"

    @classmethod
    def parse(cls, refs: Sequence[str], *, method: str = "ties",
              weights: str | Sequence[float] | None = None,
              params: Mapping[str, Any] | None = None, rank: Rank = None, seed: int = 0,
              name: str | None = None, out_dir: Path | None = None,
              allow_base_mismatch: bool = False, device: str = "cpu") -> MergeRequest:
        """Build a request from option values as given (``weights="0.5,0.5"``,
        ``rank="16"``); None parameters are "not chosen" and dropped.

        Raises:
            BadInputError: Fewer than two refs, bad weights or rank.
        """
        if len(refs) < 2:
            raise BadInputError("merge needs at least two adapters",
                                fix="adapters merge A B --method ties")
        parsed = None if weights is None else tuple(parse_weights(weights, len(refs)))
        return cls(refs=tuple(refs), method=method, weights=parsed,
                   params={k: v for k, v in (params or {}).items() if v is not None},
                   rank=parse_rank(rank), seed=seed, name=name, out_dir=out_dir,
                   allow_base_mismatch=allow_base_mismatch, device=device)

    def target(self, first_name: str) -> str:
        """The output name: :attr:`name`, else ``<first_name>-<method>[-<align>]``."""
        align = self.params.get("align")
        return self.name or f"{first_name}-{self.method}" + (f"-{align}" if align else "")


@dataclass(frozen=True)
class MergeReport:
    """What a merge stored and measured (the command's ``--json`` document).

    Attributes:
        pushed: The push (an identical earlier merge is returned with ``created`` False).
        merge: The engine's report (:attr:`merging.lora.results.MergeResult.report`).
        warnings: Base-check warnings, then the merge's own.
        out: Where the PEFT directory was also written, if asked.
    """

    pushed: PushResult
    merge: Mapping[str, Any]
    warnings: tuple[str, ...]
    out: str | None = None

    @property
    def output_ranks(self) -> list[int]:
        """The distinct output ranks of the modules, ascending."""
        return sorted({m["rank"] for m in self.merge["modules"].values()})

    def to_json(self) -> dict[str, Any]:
        """The push's JSON plus the merge's numbers (``adapters merge --json``)."""
        report = self.merge
        return {**self.pushed.to_json(), "method": report["method"],
                "parameters": report["parameters"], "weights": report["weights"],
                "seed": report["seed"], "rank": report["rank"], "output_ranks": self.output_ranks,
                "error": report["error"], "max_error": report["max_error"],
                "modules": report["modules"], "warnings": list(self.warnings), "out": self.out,
                "device": report["device"]}


@contextlib.contextmanager
def _no_progress(_description: str, _total: int) -> Iterator[Advance]:
    yield lambda _n: None


def merge_versions(store: Store, request: MergeRequest, *,
                   progress: ProgressFactory | None = None) -> MergeReport:
    """Merge the stored versions ``request.refs`` and push the result (module docstring).

    Args:
        store: The registry holding the inputs; the output is pushed there.
        request: What to merge (:meth:`MergeRequest.parse`).
        progress: Progress bar factory over the modules (default: none).

    Returns:
        The :class:`MergeReport`.

    Raises:
        NotFoundError: An input ref is not in the store.
        BadInputError: Bad output name, method or parameters, a device torch does not
            see; the output fails the ingest checks.
        BaseMismatchError: Inputs of different base structure, or different base weights
            without ``allow_base_mismatch``; module shapes that disagree.
        UnsupportedAdapterError: Inputs that cannot be merged (DoRA, ...).
        ConflictError: ``out_dir`` exists and is not empty.
    """
    from merging.devices import resolve_device
    from merging.lora.engine import merge_adapters
    from merging.lora.inputs import check_bases, module_union
    from merging.lora.methods import get_method
    from merging.lora.peft_output import check_out_dir, publish_staged, stage_peft_dir
    from merging.lora.publish import push_merge
    from registry.fsutil import check_outside, leased_temp_dir
    from registry.storage.failpoints import failpoint
    from registry.storage.refs import validate_name

    versions = [store.resolve(ref) for ref in request.refs]
    target = request.target(versions[0].name)
    validate_name(target)
    if request.out_dir is not None:
        check_out_dir(request.out_dir)  # before the work, not after it
        check_outside(request.out_dir, store.root)
    weights = list(request.weights) if request.weights is not None else None
    get_method(request.method).resolve(dict(request.params), weights or [1.0] * len(versions))
    device = resolve_device(request.device)
    labels = [f"{v.name}@{v.short}" for v in versions]
    base_warnings = check_bases([v.record.get("base_model") for v in versions], labels,
                                allow_weights_mismatch=request.allow_base_mismatch)
    with leased_temp_dir(store.root / "tmp", "merge-") as work_dir:  # gc leaves it alone
        adapters = [load_stored(store, v, work_dir / f"input-{i}") for i, v in enumerate(versions)]
        with (progress or _no_progress)(f"merging ({request.method})",
                                        len(module_union(adapters))) as advance:
            result = merge_adapters(adapters, weights, request.method, params=dict(request.params),
                                    rank=request.rank, seed=request.seed, progress=advance,
                                    labels=labels, device=device)
        # --out is staged first (a bad --out fails before anything is pushed), published
        # last: a kill in between leaves the version without its --out, and the same command
        # run again pushes nothing new and publishes the same bytes
        staged = stage_peft_dir(result, request.out_dir) if request.out_dir is not None else None
        try:
            pushed = push_merge(store, versions, result, target, work_dir=work_dir,
                                method=request.method, warnings=base_warnings,
                                allow_base_mismatch=request.allow_base_mismatch)
            failpoint("out.before_publish")
            written = (str(publish_staged(staged, request.out_dir))
                       if staged is not None and request.out_dir is not None else None)
        except BaseException:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise
    return MergeReport(pushed=pushed, merge=result.report,
                       warnings=tuple(base_warnings + result.report["warnings"]), out=written)


def load_stored(store: Store, version: Version, dest: Path) -> LoraAdapter:
    """A stored version materialized at ``dest`` and opened for merging; a refusal names
    the version (``name@digest``), not the scratch directory it was copied to.

    Raises:
        BadInputError / UnsupportedAdapterError: As :func:`merging.adapter.load_adapter`.
    """
    from merging.adapter import load_adapter

    path = store.materialize(version, dest)
    try:
        return load_adapter(path)
    except BadInputError as err:
        raise type(err)(err.message.replace(str(path), version.ref), fix=err.fix) from None
