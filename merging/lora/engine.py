"""The merge engine: N LoRA adapters -> one LoRA adapter, one module at a time.

For every module in the union of the inputs' modules (sorted by name):

1. read that module's A and B from each input that has it (an input without the
   module contributes a zero delta: it is left out of elections and sums, but its
   weight still counts in ``--normalize``), fold each input's scale ``s_i`` into
   ``B_i`` and convert to float32;
2. call the method (:mod:`merging.lora.methods`), which returns exact factors or the
   dense merged delta; with ``align="knots"`` the entry-wise method runs on the
   inputs' coefficients in their shared SVD basis instead, and the result is the
   exact factors (basis, merged coefficients) (:mod:`merging.lora.align`);
3. turn that into output factors (:mod:`merging.lora.factorize`): exact methods are
   re-factored to their true rank (``cat`` is kept as concatenated), dense results
   by truncated randomized SVD to ``rank`` (default: the largest input rank of the
   module), ``rank="full"`` keeps the exact delta at full rank;
4. cast to the output dtype (the inputs' dtype; mixed dtypes are promoted) and
   measure the relative Frobenius error of the stored factors against the exact
   merged delta.

**Threads.** On the CPU every kernel runs single-threaded and the parallelism comes
from independent pieces run side by side (:mod:`merging.threads`), so a merge's
bytes do not depend on the thread count: small modules (at most
:data:`SIDE_BY_SIDE_ENTRIES` delta entries) and factored methods' modules are merged one
per worker; larger dense modules one at a time, their row blocks side by side.

Memory: the inputs' factors of a module plus at most one dense ``(out, in)`` float32
tensor per worker for modules of at most 4 MiB, or one larger one; the output factors are
kept (they are what gets written).

**Devices** (``device``, :func:`merging.devices.resolve_device`). Dense methods run
on the device: each module's factors are copied there and the method, the
re-factorization and the error run there; the factors come back as CPU tensors.
Methods with a grouped form (``ties``, ``magnitude_prune``, ``dare_*``, ``breadcrumbs*``;
without ``align``, rank not ``full``) go further on a GPU: same-shaped modules are
merged in groups (:mod:`merging.lora.device_trim`: batched deltas, radix-select
thresholds or DARE masks, batched randomized SVD), while a reader
thread loads the next group's factors. ``group_modules=True`` runs that grouped
path on the CPU too, where it is bit for bit the per-module path (tests). Factored
methods (linear, task_arithmetic, cat) and KnOTS-aligned merges only touch
rank-sized matrices and stay on the CPU. A result is reproducible per device;
across devices dense merges agree to float32 rounding (the tests' tolerances).

Output config: :func:`merging.lora.peft_output.output_config` (``r`` = the most common
output rank at scale 1, ``rank_pattern`` where a module's rank differs,
``target_modules`` = the union of the inputs'); :func:`merging.lora.peft_output.write_peft_dir`
writes the result as a PEFT directory. Extra tensors (``modules_to_save``
copies) are copied; the same tensor name with different contents in two inputs is
refused (``UnsupportedAdapterError``), since no merge of full weights is defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from merging.adapter import LoraAdapter, load_adapter
from merging.devices import resolve_device
from merging.lora.align import knots_merge
from merging.lora.device_trim import merge_modules_grouped
from merging.lora.factorize import (
    dense_error,
    exact_refactor,
    factored_error,
    full_factors,
    lowrank_refactor,
)
from merging.lora.methods import (
    Factors,
    MergeMethod,
    MergeParams,
    ModuleContext,
    ModuleInput,
    get_method,
)
from merging.lora.inputs import (
    check_compatible,
    copied_extras,
    finite_factors,
    module_inputs,
    module_union,
    output_dtype,
    overflow_error,
)
from merging.lora.lowrank import frobenius_errors
from merging.lora.options import Rank, parse_rank, parse_weights
from merging.lora.peft_output import output_config
from merging.lora.results import MergeResult
from merging.threads import intraop_threads, worker_pool
from merging.tied import head_factors, mirror_pair, output_ties
from registry.errors import BadInputError

ProgressCallback = Callable[[int], None]
ModuleOutcome = tuple[str, torch.Tensor, torch.Tensor, float, float, list[int]]
"""``(name, B, A, error, norm, indices of the inputs used)`` of one merged module."""
SIDE_BY_SIDE_ENTRIES = 1 << 20
"""Dense modules of at most this many entries (4 MiB of float32) are merged side by side on
the CPU, one per single-threaded worker; larger ones one at a time (module docstring)."""


def _refactored(method_output: str, result: Any, inputs: Sequence[ModuleInput], rank: Any,
                ctx: ModuleContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    if isinstance(result, Factors):
        if not (bool(torch.isfinite(result.B).all()) and bool(torch.isfinite(result.A).all())):
            raise overflow_error([ctx.name])  # weights or lambda scaled a factor past float32
        if method_output == "concat" and not isinstance(rank, int):
            b, a = result.B, result.A
        else:
            b, a = exact_refactor(result.B, result.A, rank if isinstance(rank, int) else None)
        b, a = finite_factors(ctx.name, b.to(dtype).contiguous(), a.to(dtype).contiguous())
        err, norm = factored_error(result.B, result.A, b, a)
        return b, a, err, norm
    if not bool(torch.isfinite(result).all()):
        raise overflow_error([ctx.name])
    if rank == "full":
        b, a = full_factors(result)
    else:
        target = rank if isinstance(rank, int) else max(inp.A.shape[0] for inp in inputs)
        b, a = lowrank_refactor(result, target, seed=ctx.seed, module=ctx.name)
    b, a = finite_factors(ctx.name, b.to(dtype).contiguous(), a.to(dtype).contiguous())
    if result.device.type == "cpu":
        err, norm = dense_error(result, b, a)
    else:  # one reduction, one host sync (dense_error syncs once per 64-row block)
        err, norm = (float(x) for x in frobenius_errors(result, b, a))
    return b.cpu(), a.cpu(), err, norm


def _run_method(spec: MergeMethod, inputs: Sequence[ModuleInput], params: MergeParams,
                ctx: ModuleContext) -> tuple[Any, str]:
    """The method's result for one module and its output kind.

    A KnOTS-aligned merge (``params.align == "knots"``) returns exact factors
    (shared basis, merged coefficients): :mod:`merging.lora.align`.
    """
    if params.align == "knots":
        return knots_merge(spec, inputs, params, ctx), "exact"
    return spec.fn(inputs, params, ctx), spec.output


def merge_adapters(adapters: Sequence[LoraAdapter | str | Path],
                   weights: Sequence[float] | str | None = None, method: str = "ties", *,
                   params: dict[str, Any] | None = None, rank: Rank = None,
                   seed: int | None = 0, progress: ProgressCallback | None = None,
                   labels: Sequence[str] | None = None, device: str | torch.device = "cpu",
                   group_modules: bool | None = None) -> MergeResult:
    """Merge LoRA adapters module by module on their true deltas.

    Args:
        adapters: :class:`LoraAdapter` objects or adapter directories.
        weights: One weight per adapter (default 1.0 each), or their comma-separated
            text (:func:`merging.lora.options.parse_weights`).
        method: A registered method (``linear``, ``task_arithmetic``, ``cat``,
            ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``,
            ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``).
        params: Explicitly chosen parameters (``density``, ``lambda``, ``normalize``,
            ``sign_election``, ``gamma``, ``epsilon``, ``align``); None values are
            ignored, defaults are filled in. ``align="knots"`` runs an entry-wise
            method in the KnOTS basis (:mod:`merging.lora.align`).
        rank: Output rank: None (exact methods and KnOTS-aligned merges: true rank;
            dense methods: the largest input rank of each module), an int, or
            ``"full"``.
        seed: Seed of DARE masks and randomized SVD sketches (None means 0).
        progress: Called with 1 after each module.
        labels: Names of the inputs for messages (default ``input 1``...).
        device: Where dense methods compute (``cpu``, ``cuda``, ``auto``;
            :func:`merging.devices.resolve_device`); see the module docstring.
        group_modules: Merge same-shaped modules in groups (methods with a grouped
            form: ``ties``, ``magnitude_prune``, ``dare_*``, ``breadcrumbs*``); None: on a
            non-CPU device only.

    Returns:
        The :class:`MergeResult` (its tensors are on the CPU).

    Raises:
        BadInputError: Bad weights, rank, method or parameters (density outside
            (0, 1], ...), non-finite tensors, fan_in_fan_out disagreement, a
            device torch does not see.
        UnsupportedAdapterError: DoRA, lora_bias, ... inputs; clashing
            ``modules_to_save`` tensors.
        BaseMismatchError: A module has different shapes in two inputs.
    """
    if not adapters:
        raise BadInputError("nothing to merge", fix="pass at least two adapters")
    target = resolve_device(device)  # an unusable device is refused before anything is opened
    loaded = [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]
    labels = list(labels) if labels is not None else [f"input {i + 1}" for i in range(len(loaded))]
    weights = parse_weights(weights, len(loaded))
    spec = get_method(method)
    run = _MergeRun(loaded, labels, weights, spec, spec.resolve(params, weights),
                    parse_rank(rank), 0 if seed is None else int(seed), target, group_modules)
    try:
        warnings = check_compatible(loaded, labels)
        extras = copied_extras(loaded, labels, warnings)  # clashes are refused before any work
        tensors, modules, ranks, error = run.all_modules(progress)
        tensors.update(extras)
    finally:
        for adapter in loaded:
            adapter.close()
    if output_ties(loaded, run.mirrored) is False:
        warnings.append("an input's tied embeddings (ensure_weight_tying) were merged as two "
                        "LoRAs (another input changes one side alone, or its sides differ): "
                        "the output says ensure_weight_tying false")
    zero = sum(1 for m in modules.values() if m["norm"] == 0.0)
    if zero:  # e.g. a density so small that int(density * numel) keeps nothing
        warnings.append(f"{zero} of {len(modules)} merged modules are zero (nothing survived "
                        "the merge there; is the density too small?)")
    errors = [m["error"] for m in modules.values()]
    report = {
        "method": spec.name, "parameters": spec.recorded(run.params), "weights": weights,
        "seed": run.seed, "rank": run.rank, "dtype": str(run.dtype).removeprefix("torch."),
        "modules": modules, "error": error, "max_error": max(errors, default=0.0),
        "warnings": warnings, "device": str(run.device),
    }
    return MergeResult(config=output_config(loaded, ranks, ties=output_ties(loaded, run.mirrored)),
                       tensors=tensors, report=report)


class _MergeRun:
    """One merge's settings and its per-module step (:meth:`one`), run over every module
    in name order by :meth:`all_modules`."""

    def __init__(self, loaded: Sequence[LoraAdapter], labels: Sequence[str],
                 weights: Sequence[float], spec: MergeMethod, params: MergeParams, rank: Rank,
                 seed: int, device: torch.device, group_modules: bool | None) -> None:
        self.loaded, self.labels, self.weights = loaded, labels, weights
        self.spec, self.params, self.rank, self.seed = spec, params, rank, seed
        self.dtype = output_dtype(loaded)
        # tied embeddings (ensure_weight_tying): the embedding is merged, lm_head mirrors it
        self.mirrored = mirror_pair(loaded)
        self.fan_in_fan_out = bool(loaded[0].config.get("fan_in_fan_out", False))
        # Where modules compute (module docstring): ``device`` for dense methods, grouped
        # for ties/magnitude_prune on a non-CPU device (or when asked).
        self.device = device
        dense = spec.output == "dense" and params.align != "knots"
        self.compute = device if dense else torch.device("cpu")
        wanted = device.type != "cpu" if group_modules is None else group_modules
        self.grouped_path = wanted and dense and spec.grouped is not None and rank != "full"

    def _transposed(self, name: str) -> bool:
        """Whether the model stores module ``name`` as the transpose of its delta."""
        return next(a.infos[name] for a in self.loaded if name in a.infos).embedding or self.fan_in_fan_out

    def one(self, name: str) -> ModuleOutcome:
        """Merge module ``name``: (name, B, A, error, norm, indices of the inputs used)."""
        inputs = module_inputs(self.loaded, self.weights, self.labels, name, self.compute)
        info = next(a.infos[name] for a in self.loaded if name in a.infos)
        ctx = ModuleContext(name=name, shape=info.shape, seed=self.seed, transposed=self._transposed(name))
        result, output = _run_method(self.spec, inputs, self.params, ctx)
        b, a, err, norm = _refactored(output, result, inputs, self.rank, ctx, self.dtype)
        return name, b, a, err, norm, [inp.index for inp in inputs]

    def _group_inputs(self, names: Sequence[str]) -> list[list[ModuleInput]]:
        cpu = torch.device("cpu")
        return [module_inputs(self.loaded, self.weights, self.labels, name, cpu) for name in names]

    def grouped(self, names: Sequence[str], progress: ProgressCallback | None
                ) -> Iterator[ModuleOutcome]:
        """:meth:`one` for every module, computed by groups (:func:`merge_modules_grouped`),
        handed out in ``names`` order (the overall error sums in that order)."""
        shapes = {n: next(a.infos[n] for a in self.loaded if n in a.infos).shape for n in names}
        inputs_of = {n: tuple(i for i, a in enumerate(self.loaded) if n in a.infos) for n in names}
        done: dict[str, ModuleOutcome] = {}
        form = self.spec.grouped
        assert form is not None  # grouped_path requires it
        for outcome in merge_modules_grouped(
                shapes, inputs_of, self._group_inputs, self.params, elect=form.elect,
                device=self.device, rank=self.rank if isinstance(self.rank, int) else None,
                seed=self.seed, dtype=self.dtype, select=form.select, transposed=self._transposed):
            done[outcome[0]] = outcome
            if progress is not None:
                progress(1)
        return (done[name] for name in names)

    def _side_by_side(self, name: str) -> bool:
        """Whether ``name`` is merged on a worker of its own (small or factored, on the CPU)."""
        if self.compute.type != "cpu":
            return False
        if self.spec.output != "dense" or self.params.align == "knots":
            return True  # rank-sized matrices only
        rows, cols = next(a.infos[name] for a in self.loaded if name in a.infos).shape
        return rows * cols <= SIDE_BY_SIDE_ENTRIES

    def _ungrouped(self, names: Sequence[str], progress: ProgressCallback | None
                   ) -> dict[str, ModuleOutcome]:
        """:meth:`one` for every module: small ones side by side on single-threaded workers,
        then the large ones one at a time, each parallel inside (its row blocks)."""
        side = [name for name in names if self._side_by_side(name)]
        done: dict[str, ModuleOutcome] = {}
        workers = min(torch.get_num_threads(), len(side))
        with worker_pool(workers) if workers > 1 else intraop_threads(1) as pool:
            for outcome in pool.map(self.one, side) if pool else map(self.one, side):
                done[outcome[0]] = outcome
                if progress is not None:
                    progress(1)
        for name in names:
            if name not in done:
                done[name] = self.one(name)
                if progress is not None:
                    progress(1)
        return done

    def all_modules(self, progress: ProgressCallback | None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, int], float]:
        """Every module: (tensors, per-module report, ranks, overall relative error)."""
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, Any]] = {}
        ranks: dict[str, int] = {}
        err2 = norm2 = 0.0
        mirrored = self.mirrored
        names = [n for n in module_union(self.loaded) if mirrored is None or n != mirrored.head]
        if self.grouped_path:
            outcomes: Iterator[ModuleOutcome] | list[ModuleOutcome] = self.grouped(names, progress)
        else:
            done = self._ungrouped(names, progress)
            outcomes = [done[name] for name in names]  # name order: the overall error sums in it
        for name, b, a, err, norm, used in outcomes:
            keys = next(ad.infos[name] for ad in self.loaded if name in ad.infos).keys
            tensors[keys.a], tensors[keys.b] = a, b
            ranks[name] = a.shape[0]
            modules[name] = {"rank": a.shape[0], "error": err / norm if norm > 0 else 0.0,
                             "norm": norm, "inputs": used}
            err2, norm2 = err2 + err * err, norm2 + norm * norm
            if mirrored is not None and name == mirrored.embed:
                head = next(ad.infos[mirrored.head] for ad in self.loaded if mirrored.head in ad.infos)
                tensors[head.keys.b], tensors[head.keys.a] = head_factors(b, a)
                ranks[mirrored.head] = a.shape[0]
                modules[mirrored.head] = {**modules[name], "mirrors": name}
                err2, norm2 = err2 + err * err, norm2 + norm * norm
        return tensors, modules, ranks, math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
