"""The tensor-by-tensor pipeline behind merge-and-unload and requantization.

:class:`Rewrite` executes each shard's planned jobs (:class:`merging.model.plan.Job`)
into its :class:`merging.model.shard_writer.ShardWriter`:

* an unchanged tensor is copied inside the kernel (``copy_file_range``), or read and
  written in ~16 MB pieces when its bytes must be hashed;
* a LoRA target (no quantization) is merged in row ranges (the arithmetic, float32
  or bfloat16, is :mod:`merging.model.rowmerge`) by a small pool of threads (torch ops
  release the GIL; each worker sets torch single-threaded for itself, as the setting is
  per thread: :mod:`merging.threads`);
* everything else (replacement, QLoRA round trip, quantization, or keeping the
  unquantized tensors for the logits probe) is done on the whole tensor, on the
  calling thread with :data:`WORKERS` intra-op threads.

Two pipelines. **Fast** (nothing is hashed, no probe): every shard's writer is open at
once and each tensor's byte range is reserved in order (:meth:`ShardWriter.reserve`);
each worker task then copies an unchanged tensor in the kernel, or builds a module's
factors and reads, merges and writes (``pwrite``) its row ranges at their own
offsets; tasks finish in any order. The shards' task streams are interleaved, so the
two workers mostly write different files (buffered writes to one file serialize on
its inode lock) and no shard ends in an idle tail. On the 1B benchmark this costs
~1.7 CPU-s per 2.2 GB, about two user-space copies of the bytes plus the arithmetic.

**Ordered** (a recorded unload hashes base and output bytes, sha256 in file order):
shard by shard, ranges are consumed in order on the calling thread, which hashes the
base bytes, and written by the writer thread, which hashes the output, with at most
:data:`WINDOW` ranges in flight in pooled buffers (:mod:`merging.model.buffers`).

Either way the merged weight's Frobenius norm doubles as the NaN/Inf check, and the
cyclic garbage collector is paused (:func:`merging.model.layout.paused_gc`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

import torch

from merging.adapter import LoraAdapter, ModuleInfo
from merging.dtypes import torch_dtype
from merging.threads import single_threaded_pool
from merging.model.bnb import QuantSpec, quantize_weight, relative_error, roundtrip
from merging.model.buffers import BufferPool, byte_view
from merging.model.layout import SourceTensor, TensorReader, paused_gc, row_chunks, to_float32, torch_threads
from merging.model.plan import Job
from merging.model.results import ModuleReport
from merging.model.rowmerge import RowFactors, add_delta, merge_ranges, read_merge
from merging.model.shard_writer import MAX_PENDING, ShardWriter
from registry.errors import BadInputError
from registry.formats.safetensors_header import read_header
from registry.progress import ProgressCallback

_BROKEN_ADAPTER = "the adapter is broken (diverged training?); retrain or pick another checkpoint"
WORKERS = 2
"""Threads merging row ranges in parallel."""
WINDOW = 2
"""Row ranges in flight (computed but not yet written), across tensors."""
MERGE_CHUNK_BYTES = 4 << 20
"""Float32 bytes of one row range on the ordered path (its base-dtype input and output
come on top, in :data:`BUFFERS` pooled buffers)."""
FAST_CHUNK_BYTES = 8 << 20
"""Float32 bytes of one row range on the fast path (one buffer per worker). Measured on
the 1B benchmark: 2 MB ranges 1.20 s, 4 MB 0.98 s, 8 MB 0.88 s, 16 MB 1.46 s (fewer
ranges cost less Python per byte until a range no longer stays in cache between the
merge, the norm and the write)."""
TASK_BYTES = 64 << 20
"""Float32 bytes of a LoRA target's row ranges one worker task merges: most modules are
one task (no per-range futures); a larger one (an ``lm_head`` on a big vocabulary) is
split so both workers share it."""
BUFFERS = 2 * (WINDOW + 1 + MAX_PENDING) + 2
"""Pooled row-range buffers (:mod:`merging.model.buffers`). A range holds up to two from
submission until the writer has written it; at most ``WINDOW + 1`` ranges wait to be
consumed and ``MAX_PENDING`` to be written, and the consuming thread takes the next
two, so the pool never runs dry for good (taking them in the workers could: a worker
waiting for a buffer that only a later, unconsumed range holds)."""


class Rewrite:
    """One rewrite's state: readers, hashes, reports, quantization sums, probe tensors."""

    def __init__(self, adapter: LoraAdapter | None, spec: QuantSpec | None,
                 qspec: QuantSpec | None, *, hash_base: bool, collect: bool,
                 progress: ProgressCallback | None,
                 on_tensor: Callable[[str], None] | None) -> None:
        self.adapter, self.spec, self.qspec = adapter, spec, qspec
        self.reader = TensorReader()
        self.adapter_header = read_header(adapter.weights_path) if adapter else None
        self.base_hashes: dict[str, str] | None = {} if hash_base else None
        self.reports: list[ModuleReport] = []
        self.quant_sq = [0.0, 0.0]
        self.state: dict[str, torch.Tensor] | None = {} if collect else None
        self.progress, self.on_tensor = progress, on_tensor
        self._pool = single_threaded_pool(WORKERS, "merge")
        self._buffers = BufferPool(BUFFERS, MERGE_CHUNK_BYTES)
        self._local = threading.local()  # each fast-path worker's own read buffer

    def close(self) -> None:
        """Stop the merge threads and close the files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    def adapter_tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor, read with plain file reads (no mmap; see merging.model.layout)."""
        header = self.adapter_header
        assert header is not None and self.adapter is not None
        return self.reader.read(SourceTensor(key, self.adapter.weights_path, header.tensors[key],
                                             header.data_offset))

    def factors(self, info: ModuleInfo) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """A, B (float32), scale and ``||s·B·A||_F`` (from the r x r Gram matrices).

        Raises:
            BadInputError: NaN/Inf in A or B, naming the module (a non-finite element
                makes the Gram sum non-finite, so the clean case costs nothing extra).
        """
        a = self.adapter_tensor(info.keys.a).float()
        b = self.adapter_tensor(info.keys.b).float()
        total = float(((b.T @ b).double() * (a @ a.T).double()).sum())
        if not math.isfinite(total):
            for label, tensor in (("lora_A", a), ("lora_B", b)):
                if not bool(torch.isfinite(tensor).all()):
                    raise BadInputError(f"adapter module {info.name} has NaN/Inf values in "
                                        f"{label}", fix=_BROKEN_ADAPTER)
            a64, b64 = a.double(), b.double()  # finite, but float32 products overflowed
            total = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
        return a, b, info.scale, abs(info.scale) * math.sqrt(max(total, 0.0))

    def check_adapter_finite(self) -> None:
        """Refuse NaN/Inf in the adapter's extra tensors (``modules_to_save``) before
        anything is written; LoRA factors are checked as they are read (:meth:`factors`).

        Raises:
            BadInputError: the extra tensor.
        """
        assert self.adapter is not None
        for extra in self.adapter.extras:
            tensor = self.adapter_tensor(extra)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BadInputError(f"adapter tensor {extra} has NaN/Inf values",
                                    fix=_BROKEN_ADAPTER)

    # ---- the pipeline --------------------------------------------------------------

    def write(self, parts: list[tuple[list[Job], ShardWriter]]) -> None:
        """Execute each shard's ``jobs`` into its writer (module doc): all shards at
        once on the fast path, one after the other on the ordered path."""
        with paused_gc():
            if self.base_hashes is None and self.state is None and \
                    not any(writer.hash_tensors for _, writer in parts):
                self._write_fast(parts)
                return
            for jobs, writer in parts:
                self._write_ordered(jobs, writer)

    def _write_ordered(self, jobs: list[Job], writer: ShardWriter) -> None:
        queue: deque[tuple[str, Job, Any]] = deque()
        in_flight = 0
        for job in jobs:
            for step in self._steps(job, writer):
                queue.append(step)
                in_flight += step[0] == "rows"
                while in_flight > WINDOW or (queue and queue[0][0] != "rows"):
                    in_flight -= self._consume(queue.popleft(), writer)
        while queue:
            self._consume(queue.popleft(), writer)

    def _write_fast(self, parts: list[tuple[list[Job], ShardWriter]]) -> None:
        """The fast path (module doc). Each shard's tasks come from :meth:`_fast_tasks`,
        which reserves byte ranges in job order; the shards' task streams are
        interleaved, and each task is submitted as soon as it is planned: two workers
        writing one file queue on its inode lock, and one task stream for the whole
        model leaves no idle tail per shard."""
        pending: list[tuple[Job, Future[tuple[int, float]], Any]] = []
        try:
            # in order within a shard: a module's first group is ahead of its others
            for batch in itertools.zip_longest(*(self._fast_tasks(jobs, writer)
                                                 for jobs, writer in parts)):
                pending.extend((job, self._pool.submit(task), sums)
                               for job, task, sums in filter(None, batch))
            for item in pending:
                self._collect(*item)
        finally:  # workers write into the writers' files: none may outlive this call
            for _, future, _ in pending:
                future.cancel()
            wait([future for _, future, _ in pending])

    def _fast_tasks(self, jobs: list[Job], writer: ShardWriter
                    ) -> Iterator[tuple[Job, Callable[[], tuple[int, float]], Any]]:
        """One shard's worker tasks, as ``(job, task, sums)``: a copy (``sums`` None) or
        a group of a LoRA target's row ranges (up to :data:`TASK_BYTES`; most modules
        are one group) with the module's running sums. Whole-tensor jobs run here, on
        the calling thread, as they append."""
        for job in jobs:
            if job.quant or job.qlora or job.replacement:
                self._whole(job, writer, None)
                self._done(job, None)
                continue
            offset = writer.reserve(job.out_name, job.src.dtype, job.src.shape)
            if job.lora is None:
                yield job, functools.partial(self._copy_at, job, writer, offset), None
                continue
            ranges = list(row_chunks(job.src.shape, 4, FAST_CHUNK_BYTES))
            per_task = max(1, TASK_BYTES // FAST_CHUNK_BYTES)
            groups = [ranges[i:i + per_task] for i in range(0, len(ranges), per_task)]
            sums: dict[str, Any] = {"sq": 0.0, "left": len(groups), "factors": Future()}
            for index, group in enumerate(groups):
                yield job, functools.partial(self._merge_group, job, writer, offset, group,
                                             sums, index == 0), sums

    def _merge_group(self, job: Job, writer: ShardWriter, offset: int,
                     ranges: list[tuple[int, int]], sums: dict[str, Any], first: bool
                     ) -> tuple[int, float]:
        """Worker task. The first group builds the module's factors and hands them to
        the others through ``sums["factors"]``; it was submitted before them, so it is
        running or done when they wait: no deadlock."""
        assert job.lora is not None
        factors: Future[RowFactors] = sums["factors"]
        if first:
            try:
                a, b, scale, sums["delta_fro"] = self.factors(job.lora)
                factors.set_result(RowFactors.build(a, b, scale, job.transposed,
                                                    job.src.dtype))
            except BaseException as error:  # the other groups wait on it: hand it over
                factors.set_exception(error)
                raise
        return merge_ranges(self.reader, writer, offset, job.src, factors.result(), ranges,
                            self._local, FAST_CHUNK_BYTES)

    def _copy_at(self, job: Job, writer: ShardWriter, offset: int) -> tuple[int, float]:
        """An unchanged tensor into its reserved range: in the kernel, else by hand."""
        src = job.src
        if not writer.copy_at(self.reader.handle(src.file), src.data_offset + src.info.start,
                              src.info.nbytes, offset):
            row_bytes = src.info.nbytes // max(src.shape[0], 1) if src.shape else 0
            for r0, r1 in row_chunks(src.shape, torch_dtype(src.dtype).itemsize):
                writer.write_at(offset + r0 * row_bytes, self.reader.read(src, r0, r1))
        return 0, 0.0

    def _collect(self, job: Job, future: Future[tuple[int, float]], sums: Any) -> None:
        nbytes, sq = future.result()  # a group's sum of squared range norms (a copy: 0)
        if sums is None:  # a copy
            if self.progress is not None and job.hash_src:
                self.progress(job.src.info.nbytes)
            self._done(job, None)
            return
        if not math.isfinite(sq):
            self._refuse(job)
        sums["sq"] += sq
        sums["left"] -= 1
        if self.progress is not None:
            self.progress(nbytes)
        if not sums["left"]:
            self.reports.append(ModuleReport(job.out_name, "lora", sums["delta_fro"],
                                             math.sqrt(sums["sq"])))
            del sums["factors"]  # the task list lives to the end; the factors need not
            self._done(job, None)

    def _steps(self, job: Job, writer: ShardWriter) -> Iterator[tuple[str, Job, Any]]:
        hasher = hashlib.sha256() if self.base_hashes is not None and job.hash_src else None
        simple = not (job.quant or job.qlora or job.replacement) and self.state is None
        if not simple or job.lora is None:
            yield "call", job, (self._copy if simple else self._whole, hasher)
            return
        a, b, scale, delta_fro = self.factors(job.lora)
        sums = {"sq": 0.0, "hasher": hasher, "delta_fro": delta_fro}
        yield "begin", job, sums
        factors = RowFactors.build(a, b, scale, job.transposed, job.src.dtype)
        keep_raw = hasher is not None
        row_bytes = job.src.info.nbytes // max(job.src.shape[0], 1)
        for r0, r1 in row_chunks(job.src.shape, 4, MERGE_CHUNK_BYTES):
            # taken here, in order, never in the workers: see BUFFERS
            nbytes = (r1 - r0) * row_bytes
            buffers = (self._buffers.acquire(nbytes), self._buffers.acquire(nbytes)
                       if factors.split is not None and keep_raw else None)
            yield "rows", job, (self._pool.submit(
                read_merge, self.reader, job.src, factors, r0, r1, keep_raw, buffers), buffers)
        yield "end", job, sums

    def _consume(self, step: tuple[str, Job, Any], writer: ShardWriter) -> int:
        kind, job, payload = step
        if kind == "call":  # the whole job on this thread (same writer as _steps')
            run, hasher = payload
            run(job, writer, hasher)
            self._done(job, hasher)
        elif kind == "begin":
            writer.begin(job.out_name, job.src.dtype, job.src.shape)
            self._sums = payload
        elif kind == "rows":
            future, buffers = payload
            raw, out, norm = future.result()
            if not math.isfinite(norm):
                self._refuse(job)
            self._sums["sq"] += norm * norm
            if self._sums["hasher"] is not None:
                self._sums["hasher"].update(memoryview(raw.reshape(-1).view(torch.uint8).numpy()))
            if self.progress is not None:
                self.progress(raw.numel() * raw.element_size())
            writer.write(out, functools.partial(self._release, buffers))
            return 1
        else:
            writer.end()
            self.reports.append(ModuleReport(job.out_name, "lora", payload["delta_fro"],
                                             math.sqrt(payload["sq"])))
            self._done(job, payload["hasher"])
        return 0

    def _release(self, buffers: tuple[torch.Tensor | None, ...]) -> None:
        for buffer in buffers:
            if buffer is not None:
                self._buffers.release(buffer)

    def _refuse(self, job: Job) -> None:
        what = f"module {job.lora.name}" if job.lora else f"tensor {job.replacement}"
        raise BadInputError(f"merged weight {job.out_name} has NaN/Inf values ({what})",
                            fix="the adapter overflows this base dtype; check the adapter")

    def _done(self, job: Job, hasher: Any) -> None:
        if hasher is not None:
            self.base_hashes[job.src.name] = hasher.hexdigest()  # type: ignore[index]
        if self.on_tensor is not None:
            self.on_tensor(job.out_name)

    def _read(self, job: Job, hasher: Any, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        tensor = self.reader.read(job.src, r0, r1)
        if hasher is not None:
            hasher.update(byte_view(tensor))
        if self.progress is not None and job.hash_src:
            self.progress(tensor.numel() * tensor.element_size())
        return tensor

    def _copy(self, job: Job, writer: ShardWriter, hasher: Any) -> None:
        """An unchanged tensor: in-kernel copy when nothing hashes it, else read + write."""
        src, shape = job.src, job.src.shape
        writer.begin(job.out_name, src.dtype, shape)
        start = src.data_offset + src.info.start
        if hasher is None and writer.copy_range(self.reader.handle(src.file), start,
                                                src.info.nbytes):
            if self.progress is not None and job.hash_src:
                self.progress(src.info.nbytes)
        else:
            for r0, r1 in row_chunks(shape, torch_dtype(src.dtype).itemsize):
                writer.write(self._read(job, hasher, r0, r1))
        writer.end()

    def _norm_sq(self, job: Job, merged: torch.Tensor, out: torch.Tensor) -> float:
        norm = float(torch.linalg.vector_norm(merged))
        if not math.isfinite(norm) or out.dtype == torch.float16:
            if not bool(torch.isfinite(out).all()):
                self._refuse(job)
            norm = float(merged.double().norm())
        return norm * norm

    def _whole(self, job: Job, writer: ShardWriter, hasher: Any) -> None:
        """Replacement, QLoRA round trip, merge and/or quantization of a whole tensor, on this
        thread with ``WORKERS`` intra-op threads (bnb's CPU quantization: 1.7x faster on two)."""
        with torch_threads(WORKERS):
            self._whole_tensor(job, writer, hasher)

    def _whole_tensor(self, job: Job, writer: ShardWriter, hasher: Any) -> None:
        dtype = torch_dtype(job.src.dtype)
        base = self._read(job, hasher)
        weight = base if job.replacement is None else \
            self.adapter_tensor(job.replacement).to(dtype)
        delta_fro = weight_fro = quant_err = None
        if job.replacement is not None:
            delta_fro = float((weight.double() - base.double()).norm())
        if job.qlora and self.qspec is not None:
            weight = roundtrip(weight, self.qspec, transposed=job.transposed_q)
        if job.lora is not None:
            a, b, scale, delta_fro = self.factors(job.lora)
            merged = to_float32(weight) if weight.dtype != torch.float32 else weight.clone()
            add_delta(merged, a, b, scale, job.transposed, 0, job.src.shape[0])
            weight = merged.to(dtype)
        if job.lora is not None or job.replacement is not None:
            weight_fro = math.sqrt(self._norm_sq(job, to_float32(weight), weight))
        if job.quant and self.spec is not None:
            tensors, deq = quantize_weight(job.out_name, weight, self.spec,
                                           transposed=job.transposed_q)
            err_sq, w_sq = relative_error(weight, deq, name=job.out_name, method=self.spec.method)
            self.quant_sq = [self.quant_sq[0] + err_sq, self.quant_sq[1] + w_sq]
            quant_err = math.sqrt(err_sq / w_sq) if w_sq > 0 else 0.0
            weight_fro = math.sqrt(w_sq) if weight_fro is None else weight_fro
            for key, tensor in tensors.items():
                writer.add(key, tensor)
        else:
            writer.add(job.out_name, weight)
        if self.state is not None:
            self.state[job.out_name] = weight.clone()
        if job.kind != "copy" or job.quant:
            kind = job.kind if job.kind != "copy" else "quantized"
            self.reports.append(ModuleReport(job.out_name, kind, delta_fro, weight_fro, quant_err))
