"""Merges whose bits do not depend on the thread count: single-threaded kernels, run side by side.

**Why.** The last bits of LAPACK's SVD and QR depend on how many threads compute them
(measured with torch 2.13's MKL: the same 576x1536 SVD with 1 and with 2 threads
differs), and so would every factor a re-factorization writes: the same ``adapters
merge`` would get another digest on a 16-core CI box than on a 2-core laptop, or under
``OMP_NUM_THREADS=1``. So the CPU merge computes every piece with single-threaded torch
ops and gets its parallelism from running independent pieces at once: 64-row blocks of
one module (:func:`block_map`), the row blocks of a product (:func:`row_product`), or
whole small modules (:func:`worker_pool`). A piece's result then depends only on its
inputs, not on how many workers there are or which one ran it.

**Per-thread settings.** torch's intra-op thread count is a property of the calling
thread (OpenMP's ``nthreads`` setting and MKL's local one): a worker started by a thread
that called ``torch.set_num_threads(1)`` still runs with the default count (measured:
its SVD matched a 2-thread one). Every pool here therefore sets 1 thread in each worker
when it starts. Before, workers ran N-thread kernels N at a time, N² threads on N cores
(the likely cause of a CPU merge taking 13 s on 16 cores against 4.5 s on 2).
:func:`intraop_threads` sets the calling thread's count for a block of code (the LAPACK
calls of a module merged on the main thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

PRODUCT_ROWS = 256
"""Rows per block of :func:`row_product` (fixed: part of what the result's bits depend on)."""

T = TypeVar("T")
B = TypeVar("B")


@contextmanager
def intraop_threads(n: int) -> Iterator[None]:
    """Set the calling thread's torch intra-op thread count to ``n`` inside the block."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)


def single_threaded_pool(workers: int, name: str = "") -> ThreadPoolExecutor:
    """A thread pool of ``workers`` workers, each running single-threaded torch ops."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                              initializer=_single_threaded_worker)


@contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """:func:`single_threaded_pool` for a block: pending work is cancelled on the way out,
    and the caller's thread count is what it was (OpenMP runtimes differ in how far a
    worker's setting reaches, so it is restored rather than assumed)."""
    old = torch.get_num_threads()
    pool = single_threaded_pool(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def slices(total: int, size: int) -> list[slice]:
    """Consecutive ``size``-long slices covering ``range(total)``."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def block_map(fn: Callable[[int, B], T], blocks: Sequence[B]) -> list[T]:
    """``[fn(j, block) for j, block in enumerate(blocks)]``, blocks side by side (a block is
    usually a row ``slice``; any independent piece of work will do).

    One worker per torch intra-op thread of the caller, each running single-threaded
    ops (a caller that is itself a single-threaded worker runs the blocks in turn);
    results come back in block order. ``fn`` must only touch its own block.
    """
    workers = min(torch.get_num_threads(), len(blocks))
    if workers <= 1:
        with intraop_threads(1):
            return [fn(j, b) for j, b in enumerate(blocks)]
    with worker_pool(workers) as pool:
        return list(pool.map(fn, range(len(blocks)), blocks))


def row_product(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``X @ Y`` for 2-D CPU tensors, :data:`PRODUCT_ROWS` rows of ``X`` per single-threaded block.

    Each output row is one single-threaded product over the full inner dimension, so the
    result does not depend on the thread count. ``X`` may be a transposed view
    (``A.mT`` gives ``A^T @ Y`` by column blocks of ``A``).
    """
    return torch.cat(block_map(lambda _j, rows: X[rows] @ Y, slices(X.shape[0], PRODUCT_ROWS)))
