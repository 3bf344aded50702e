"""Dense merges (TIES, DARE, Breadcrumbs, magnitude_prune) on a device, several modules at a time.

:mod:`merging.lora.sparsify` merges a module on the CPU block by block, never holding
more than one dense delta, and finds each trim threshold by sampling plus a
``kthvalue`` on the bracketed entries. On a GPU the constraints are reversed:
memory is plentiful (a 7B-shaped module's two deltas are 360 MB), launches and
host round-trips are what cost, and ``kthvalue``/``sort`` on tens of millions of
entries dominate. So here:

* the inputs' factors of a *group* of same-shaped modules are stacked (ranks
  zero-padded to the largest), copied
  once (from pinned memory, without blocking) and multiplied in one batched
  matmul into a ``(modules, inputs, out, in)`` float32 stack of true deltas;
* every threshold of the group comes from one radix select
  (:func:`merging.lora.kselect.kth_largest_magnitudes`: exact, integer counting, the
  same value ``kthvalue`` gives) and the trim is :func:`merging.lora.kselect.keep_mask`,
  the mask :func:`merging.lora.sparsify.trim_block` applies;
* DARE's masks are drawn from the very generators the per-module path uses (one per
  module, input and 64-row block, on the CPU), many side by side, and copied once per
  group; Breadcrumbs' band edges are two radix selects per delta
  (:mod:`merging.lora.group_steps`). Which step a method takes is its registered
  :class:`merging.lora.methods.GroupedForm`; methods without one (DELLA, whose ranks are
  per row, and every KnOTS-aligned merge) are merged module by module;
* the sign election and disjoint mean are :func:`merging.lora.sparsify.elect_and_merge`
  itself (element-wise, so it runs on whatever device its tensors are on), and
  magnitude_prune's sum is :func:`merging.lora.sparsify.weighted_sum`.

On the CPU the deltas are :mod:`merging.lora.sparsify`'s 64-row block products, so
a grouped merge equals the per-module one bit for bit (the engine's
``group_modules=True`` on the CPU, which the tests use to run this path without a
GPU); on another device they are one batched matmul, which rounds differently in
the last bits. On one device the result is deterministic: no atomics on floats,
no sampling.

:func:`factor_group` then turns a group's merged deltas into stored factors and
their errors: one batched randomized SVD per output rank on a GPU
(:func:`merging.lora.lowrank.lowrank_factors`, float32) and batched Frobenius errors;
on the CPU one matrix at a time with :func:`merging.lora.factorize.lowrank_refactor`
and :func:`merging.lora.factorize.dense_error`, exactly the per-module engine's steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from merging.lora import sparsify
from merging.lora.factorize import dense_error, lowrank_refactor
from merging.lora.inputs import finite_factors, overflow_error
from merging.lora.group_steps import to_device
from merging.lora.lowrank import frobenius_errors, lowrank_factors
from merging.threads import block_map
from merging.lora.methods import GroupSelectFn, MergeParams, ModuleContext, ModuleInput
from merging.lora.methods.ties import trim_select
CPU_GROUP_ENTRIES = 1 << 24
"""Delta entries per group on the CPU (64 MiB of float32)."""
GPU_GROUP_ENTRIES = 1 << 28
"""At most this many delta entries per group on a GPU (1 GiB of float32), and at most
1/64 of the device's total memory in bytes (deltas, masks, radix-select and election
temporaries come to about 20 bytes per entry)."""
GroupLoader = Callable[[Sequence[str]], list[list[ModuleInput]]]
"""Module names -> their inputs (CPU factors, scale folded into ``B``)."""
FactoredModule = tuple[torch.Tensor, torch.Tensor, float, float]
"""``(B, A, error, norm)`` of one module: CPU factors in the output dtype, and
``||D - B A||_F``, ``||D||_F`` measured on them as stored."""


def _cpu_delta(inp: ModuleInput) -> torch.Tensor:
    """``B @ A`` with :func:`merging.lora.sparsify.block_delta`'s products, thread settings included."""
    return torch.cat(block_map(lambda _j, rows: sparsify.block_delta(inp, rows),
                                        sparsify.row_blocks(inp.B.shape[0])))


def group_deltas(group: Sequence[Sequence[ModuleInput]], device: torch.device | str, *,
                 batched: bool | None = None) -> torch.Tensor:
    """The true deltas ``B_i A_i`` of a group of modules: ``(modules, inputs, out, in)`` float32.

    On the CPU every delta is the concatenation of the 64-row block products
    :mod:`merging.lora.sparsify` computes (so a grouped merge is bit for bit the per-module
    one); on another device the factors are stacked, ranks zero-padded to the largest,
    copied once and multiplied in one batched matmul.

    Args:
        group: Per module, its inputs (scale folded into ``B``); every module has
            the same number of inputs and shape. Ranks may differ: factors are
            zero-padded to the largest (finite inputs: adding ``0·x`` changes no sum,
            though the summation order of the matmul may).
        device: Where to compute.
        batched: The one-bmm path (default: on any device but the CPU). ``True`` on the
            CPU runs the device algorithm there (tests: CI has no GPU).

    Raises:
        ValueError: An empty group, or modules with different input counts or shapes.
    """
    device = torch.device(device)
    flat = [inp for inputs in group for inp in inputs]
    counts = {len(inputs) for inputs in group}
    if not flat or len(counts) != 1 or len({(i.B.shape[0], i.A.shape[1]) for i in flat}) != 1:
        raise ValueError("a group holds modules with the same input count and shape")
    if not (device.type != "cpu" if batched is None else batched):
        deltas = torch.stack([_cpu_delta(inp) for inp in flat])
    else:
        rank = max(inp.A.shape[0] for inp in flat)
        pad = torch.nn.functional.pad
        B = to_device(torch.stack([pad(inp.B.float(), (0, rank - inp.B.shape[1])) for inp in flat]), device)
        A = to_device(torch.stack([pad(inp.A.float(), (0, 0, 0, rank - inp.A.shape[0])) for inp in flat]), device)
        deltas = torch.bmm(B, A)
    return deltas.view(len(group), counts.pop(), *deltas.shape[1:])


def merge_group(group: Sequence[Sequence[ModuleInput]], params: MergeParams, *,
                elect: bool, device: torch.device | str, batched: bool | None = None,
                select: GroupSelectFn = trim_select,
                contexts: Sequence[ModuleContext] | None = None) -> torch.Tensor:
    """A dense method on a group of modules on ``device``: TIES or magnitude_prune by
    default, any method through its grouped ``select`` step.

    Args:
        group: Per module, its inputs (see :func:`group_deltas`); the weights are
            the inputs' own, position by position.
        params: Resolved parameters (``density``, ``lam``, ``sign_election``;
            ``normalize`` and ``weight_sum`` for the weighted sum).
        elect: Sign election and disjoint mean (TIES family) instead of a weighted sum.
        device: Where to compute.
        batched: See :func:`group_deltas`.
        select: The entry-wise step (the method's :class:`merging.lora.methods.GroupedForm`).
        contexts: The modules (names seed DARE's masks); default ``m0``, ``m1``... with
            the group's shape and seed 0.

    Returns:
        ``(modules, out, in)`` float32 merged deltas on ``device``; module ``m``
        is what the method returns for ``group[m]``.

    Raises:
        ValueError: See :func:`group_deltas`.
    """
    deltas = group_deltas(group, device, batched=batched)
    if contexts is None:
        shape = (int(deltas.shape[-2]), int(deltas.shape[-1]))
        contexts = [ModuleContext(name=f"m{m}", shape=shape, seed=0) for m in range(len(group))]
    select(deltas, group, contexts, params)
    normalize = params.normalize and not elect
    factor = params.lam / (params.weight_sum if normalize else 1.0)
    merged = []
    for m, inputs in enumerate(group):
        parts = list(deltas[m].unbind(0))
        weights = [inp.weight for inp in inputs]
        if elect:
            out = sparsify.elect_and_merge(parts, weights, params.sign_election)
        else:
            out = sparsify.weighted_sum(parts, weights)
        merged.append(out.mul_(factor) if factor != 1.0 else out)
    return torch.stack(merged)


def group_by_shape(shapes: dict[str, tuple[int, int]], max_entries: int,
                   inputs_of: dict[str, tuple[int, ...]] | None = None) -> list[list[str]]:
    """Module names in groups that :func:`merge_group` can take, each of bounded size.

    Args:
        shapes: Module name -> ``(out, in)``.
        max_entries: Most delta entries (all inputs counted) a group holds; a module
            larger than that is a group of its own.
        inputs_of: Module name -> the indices of the inputs that have it (modules
            are grouped only with modules of the same inputs); None: all the same.

    Returns:
        Groups of names, sorted by name within a group, in order of first name.
    """
    by_kind: dict[tuple[tuple[int, int], tuple[int, ...]], list[str]] = {}
    for name in sorted(shapes):
        kind = (shapes[name], (inputs_of or {}).get(name, ()))
        by_kind.setdefault(kind, []).append(name)
    groups: list[list[str]] = []
    for (shape, used), names in by_kind.items():
        size = math.prod(shape) * max(1, len(used))
        per_group = max(1, max_entries // size)
        groups.extend(names[i:i + per_group] for i in range(0, len(names), per_group))
    return sorted(groups)


def factor_group(merged: torch.Tensor, names: Sequence[str], ranks: Sequence[int], *, seed: int,
                 dtype: torch.dtype, batched: bool | None = None) -> list[FactoredModule]:
    """Rank-``ranks[m]`` factors of each merged delta, cast to ``dtype``, back on the CPU.

    Args:
        merged: ``(modules, out, in)`` float32 merged deltas (from :func:`merge_group`).
        names: Module names (they seed the sketches, as the per-module engine's).
        ranks: Output rank of each module.
        seed: The run's seed.
        dtype: The output dtype; errors are measured on the factors after the cast.
        batched: One batched randomized SVD per rank (default: on any device but the
            CPU, where each module is re-factored as the per-module engine does).

    Returns:
        One :data:`FactoredModule` per module, in order.

    Raises:
        ValueError: ``names`` or ``ranks`` do not have one entry per module.
        MergeRangeError: A module's factors overflow ``dtype`` (as the per-module engine).
    """
    if not len(names) == len(ranks) == merged.shape[0]:
        raise ValueError("factor_group takes one name and one rank per merged delta")
    if not (merged.device.type != "cpu" if batched is None else batched):
        out = []
        for m, name in enumerate(names):
            b, a = lowrank_refactor(merged[m], ranks[m], seed=seed, module=name)
            b, a = finite_factors(name, b.to(dtype).contiguous(), a.to(dtype).contiguous())
            out.append((b, a, *dense_error(merged[m], b, a)))
        return out
    results: list[FactoredModule | None] = [None] * len(names)
    for rank in sorted(set(ranks)):
        picked = [m for m, r in enumerate(ranks) if r == rank]
        deltas = merged if len(picked) == len(names) else merged[picked]
        B, A = lowrank_factors(deltas, rank, seed=seed, modules=[names[m] for m in picked])
        B, A = B.to(dtype), A.to(dtype)
        errors, norms = frobenius_errors(deltas, B, A)
        B_cpu, A_cpu = B.cpu(), A.cpu()
        for i, (m, err, norm) in enumerate(zip(picked, errors.tolist(), norms.tolist(),
                                               strict=True)):
            # as the per-module engine: factors that overflow the output dtype are refused
            b, a = finite_factors(names[m], host_copy(B_cpu[i]), host_copy(A_cpu[i]))
            results[m] = (b, a, err, norm)
    return [r for r in results if r is not None]


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A row-major CPU copy of ``tensor`` with storage of its own.

    cuSOLVER returns ``U`` column-major and element-wise ops keep that layout, so a
    factor sliced from a batched result is a strided view: safetensors refuses to write
    it (``merge --device cuda`` failed on SmolLM2's wide ``down_proj``), and a view would
    keep the whole batch's storage alive. ``clone()`` alone keeps the strides.
    """
    return tensor.to("cpu", copy=True, memory_format=torch.contiguous_format)


def _group_entries(device: torch.device) -> int:
    """Delta entries per group: fixed per device model (its total memory, not what is
    free now), so the groups, and with them the batched results, repeat bit for bit."""
    if device.type != "cuda":
        return CPU_GROUP_ENTRIES
    total = torch.cuda.get_device_properties(device).total_memory
    return max(1 << 20, min(GPU_GROUP_ENTRIES, total // 64))


def merge_modules_grouped(shapes: dict[str, tuple[int, int]], inputs_of: dict[str, tuple[int, ...]],
                          load: GroupLoader, params: MergeParams, *, elect: bool,
                          device: torch.device, rank: int | None, seed: int, dtype: torch.dtype,
                          batched: bool | None = None, select: GroupSelectFn = trim_select,
                          transposed: Callable[[str], bool] = lambda _name: False
                          ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float, float, list[int]]]:
    """A dense method on many modules, group by group: the engine's grouped path.

    A reader thread loads the next group's factors (``load``) while this one is merged
    on ``device``, so disk reads overlap the device's work; at most two groups' factors
    are in host memory and one group's deltas on the device.

    Args:
        shapes: Module name -> ``(out, in)``.
        inputs_of: Module name -> indices of the inputs that have it.
        load: Reads a group's inputs.
        params: Resolved parameters.
        elect: TIES (sign election) rather than magnitude_prune.
        device: Where to compute.
        rank: Output rank (None: each module's largest input rank).
        seed: The run's seed (sketches).
        dtype: Output dtype.
        batched: The device algorithms (batched deltas and SVD); default: on any device
            but the CPU. See :func:`group_deltas`.
        select: The method's entry-wise step (default: TIES's/magnitude_prune's trim).
        transposed: Whether the model stores a module as the transpose of its delta
            (for the :class:`ModuleContext` the step sees).

    Yields:
        ``(name, B, A, error, norm, indices of the inputs used)`` per module, group by group.
    """
    groups = group_by_shape(shapes, _group_entries(device), inputs_of)
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(load, groups[0]) if groups else None
        for g, group in enumerate(groups):
            inputs = ahead.result() if ahead is not None else []
            ahead = reader.submit(load, groups[g + 1]) if g + 1 < len(groups) else None
            contexts = [ModuleContext(name=name, shape=shapes[name], seed=seed,
                                      transposed=transposed(name)) for name in group]
            merged = merge_group(inputs, params, elect=elect, device=device, batched=batched,
                                 select=select, contexts=contexts)
            finite = torch.isfinite(merged).flatten(1).all(1).tolist()  # one host sync per group
            if not all(finite):
                raise overflow_error([name for name, ok in zip(group, finite, strict=True) if not ok])
            ranks = [rank if rank is not None else max(inp.A.shape[0] for inp in module)
                     for module in inputs]
            factored = factor_group(merged, group, ranks, seed=seed, dtype=dtype, batched=batched)
            del merged
            for name, module, (b, a, err, norm) in zip(group, inputs, factored, strict=True):
                yield name, b, a, err, norm, [inp.index for inp in module]
