"""Reusable read buffers for the streamed rewrite.

Merge-and-unload reads every merged tensor in row ranges of a few MB. Allocating a
fresh tensor per range looks free but is not: glibc serves multi-MB blocks from
``mmap`` or returns a freed heap top to the kernel, so every range faults its pages
in again, zero-filled, one 4 KB page at a time. Measured on a 1B bf16 model here:
~200,000 minor faults and ~0.5 s of system time, a third of the whole rewrite.

A :class:`BufferPool` holds a fixed number of buffers, faulted in once. The
rewrite takes one per row range (:meth:`BufferPool.acquire`, which blocks when all
are in use: the pool is also the pipeline's backpressure) and the shard writer
hands it back once the range's bytes are in the file (:meth:`BufferPool.release`).
Buffers are allocated on first use, so a rewrite that merges nothing allocates none.
"""

from __future__ import annotations

import math
import queue
import threading

import torch


class BufferPool:
    """``count`` byte buffers of ``nbytes`` each, shared between threads.

    Args:
        count: Buffers in the pool. With acquisitions bounded by the caller's
            pipeline depth this must exceed the number that can be held at once,
            or :meth:`acquire` waits forever.
        nbytes: Size of one buffer; larger requests are not served from the pool.
    """

    def __init__(self, count: int, nbytes: int) -> None:
        if count < 1 or nbytes < 1:
            raise ValueError(f"BufferPool needs count >= 1 and nbytes >= 1, got {count}, {nbytes}")
        self.count, self.nbytes = count, nbytes
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A free buffer (uint8, ``self.nbytes`` long), or ``None`` when ``nbytes`` is
        larger than a buffer (the caller allocates). Blocks while all are in use."""
        if nbytes > self.nbytes:
            return None
        with self._lock:
            if self._made < self.count and self._free.empty():
                self._made += 1
                return allocate(self.nbytes)
        return self._free.get()

    def release(self, buffer: torch.Tensor) -> None:
        """Give ``buffer`` (from :meth:`acquire`) back."""
        self._free.put(buffer)


def allocate(nbytes: int) -> torch.Tensor:
    """A ``uint8`` buffer of ``nbytes`` on float32 storage: 64-byte aligned, and views of
    it in any float dtype run matmuls at full speed (a plain ``uint8`` allocation viewed
    as float32 made them several times slower here)."""
    return torch.empty(math.ceil(nbytes / 4), dtype=torch.float32).view(torch.uint8)[:nbytes]


def view_as(buffer: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]
            ) -> torch.Tensor:
    """The first ``prod(shape)`` elements of ``buffer`` as a ``dtype`` tensor of
    ``shape`` (a fresh tensor when ``buffer`` is ``None``)."""
    if buffer is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[:nbytes].view(dtype).view(shape)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU ``tensor`` as a flat memoryview (no copy when it is contiguous)."""
    # ndarray has the buffer protocol; numpy's stubs declare it (``__buffer__``) only for Python >= 3.12
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
