"""Stream tensors into a safetensors file without holding the file's contents.

``safetensors.torch.save_file`` needs the whole shard as a dict of tensors, i.e. one
shard of memory; :class:`ShardWriter` needs about two chunks:

* The header's space is reserved up front from the planned tensors (names, dtypes,
  shapes, widest possible offsets); tensor bytes are then appended in order, and the
  final header, padded with spaces (which the format allows), is written last. If it
  ever outgrew the reservation the data would be shifted (one extra copy; planned
  sizes make this unreachable in practice).
* Writes go to a single background thread (at most :data:`MAX_PENDING` chunks in
  flight), so computing the next chunk overlaps writing this one; the thread also
  hashes each tensor's bytes (sha256) when asked, so a weights digest of the output
  needs no second read.
* Unchanged tensors can be copied inside the kernel (:meth:`ShardWriter.copy_range`,
  ``copy_file_range`` as ``cp`` does) when they need no hash.
* :meth:`ShardWriter.close` fsyncs, so the directory rename that publishes the output
  happens after the data is durable. Left alone, the kernel starts writing a file back
  only when dirty pages pass ``dirty_background_ratio`` (GBs on a big box), so that
  fsync would write the whole shard at the end (0.85 s for 2.2 GB here, a third of
  the rewrite). Instead every :data:`WRITEBACK_BYTES` written start writeback of that
  range (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous, Linux only), and
  the disk works while the next ranges are computed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from merging.dtypes import TORCH_TO_ST, torch_dtype
from merging.model.buffers import byte_view
from merging.model.layout import CHUNK_BYTES
from merging.model.results import WrittenShard
from merging.model.shard_plan import OutTensor

MAX_PENDING = 2
"""Chunks queued for the writer thread before :meth:`ShardWriter.write` waits."""
WRITEBACK_BYTES = 32 << 20
"""Bytes written between two writeback requests (module doc)."""
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def _header_bytes(entries: dict[str, dict[str, Any]], metadata: dict[str, str] | None) -> bytes:
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = metadata
    obj.update(entries)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class ShardWriter:
    """Writes one safetensors file tensor by tensor (see the module docstring).

    Args:
        path: Output file.
        planned: The tensors that will be written (for the header reservation).
        metadata: ``__metadata__`` of the file (``{"format": "pt"}`` by default).
        hash_tensors: sha256 every tensor's bytes (reported by :meth:`close`).
        sync: fsync on :meth:`close` (and start writeback early); off for scratch
            output, which a power cut may leave truncated.
    """

    def __init__(self, path: Path, planned: Sequence[OutTensor],
                 metadata: dict[str, str] | None = None, *, hash_tensors: bool = True,
                 sync: bool = True) -> None:
        self.path = Path(path)
        self.hash_tensors, self.sync = hash_tensors, sync
        self.metadata = {"format": "pt"} if metadata is None else metadata
        width = len(str(sum(t.nbytes for t in planned) + 1)) + 1
        fake = {t.name: {"dtype": t.dtype, "shape": list(t.shape or (10**width,)),
                         "data_offsets": [10**width, 10**width]} for t in planned}
        self.reserved = len(_header_bytes(fake, self.metadata)) + 64
        self.reserved += (-(8 + self.reserved)) % 8
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "shard-writer")
        self._pending: deque[Future[None]] = deque()
        self._entries: dict[str, dict[str, Any]] = {}
        self._hashes: dict[str, str] = {}
        self._pos = 0  # bytes of tensor data queued so far
        self._flushed = 0  # file offset up to which writeback has been started
        self._current: tuple[str, str, tuple[int, ...], int, Any] | None = None

    # ---- the writer thread --------------------------------------------------------

    def _put(self, view: memoryview, offset: int, hasher: Any, keep: Any,
             release: Callable[[], None] | None) -> None:
        del keep  # holds the tensor alive until its bytes are written
        try:
            if hasher is not None:
                hasher.update(view)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        finally:
            if release is not None:
                release()
        self._start_writeback(offset + len(view))

    def _start_writeback(self, end: int) -> None:
        """Ask the kernel to start writing ``[self._flushed, end)`` to disk (advisory:
        a failure here resurfaces, if real, from the fsync in :meth:`close`)."""
        if self.sync and _sync_file_range is not None and end - self._flushed >= WRITEBACK_BYTES:
            _sync_file_range(self._fd, self._flushed, end - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = end

    def _finish_hash(self, name: str, hasher: Any) -> None:
        self._hashes[name] = hasher.hexdigest()

    def _submit(self, fn: Any, *args: Any) -> None:
        assert self._pool is not None
        while len(self._pending) >= MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    # ---- API ----------------------------------------------------------------------

    def begin(self, name: str, dtype: str, shape: Sequence[int]) -> None:
        """Start tensor ``name``; its bytes follow through :meth:`write`."""
        if self._current is not None:
            raise RuntimeError(f"tensor {self._current[0]} not finished")
        if name in self._entries:
            raise RuntimeError(f"tensor {name} written twice")
        hasher = hashlib.sha256() if self.hash_tensors else None
        self._current = (name, dtype, tuple(int(d) for d in shape), self._pos, hasher)

    def write(self, data: torch.Tensor | bytes | memoryview,
              release: Callable[[], None] | None = None) -> None:
        """Queue bytes for writing (a tensor is written in its own dtype, row-major);
        ``release`` is called from the writer thread once they are in the file (or the
        write failed): the caller may then reuse the memory."""
        assert self._current is not None
        keep = data
        if isinstance(data, torch.Tensor):
            keep = data.detach().contiguous().reshape(-1)
            data = byte_view(keep)
        view = memoryview(data).cast("B")
        self._submit(self._put, view, 8 + self.reserved + self._pos, self._current[4], keep,
                     release)
        self._pos += len(view)

    def copy_range(self, src: BinaryIO, offset: int, count: int) -> bool:
        """Append ``count`` bytes of ``src`` from ``offset`` inside the kernel.

        Returns False, having written nothing, when the tensor is hashed or the kernel
        refuses (another filesystem, an old kernel); the caller then copies by hand.
        """
        assert self._current is not None
        if self._current[4] is not None:
            return False
        self._drain()
        if not self.copy_at(src, offset, count, 8 + self.reserved + self._pos):
            return False
        self._pos += count
        return True

    def copy_at(self, src: BinaryIO, offset: int, count: int, dst: int) -> bool:
        """Copy ``count`` bytes of ``src`` from ``offset`` to file offset ``dst`` (inside a
        range from :meth:`reserve`) in the kernel (``copy_file_range``, as ``cp`` does).
        Thread-safe like :meth:`write_at`. False when the kernel refuses (another
        filesystem, an old kernel): the caller copies by hand over the partial bytes."""
        if not hasattr(os, "copy_file_range"):
            return False
        done = 0
        try:
            while done < count:
                n = os.copy_file_range(src.fileno(), self._fd, count - done, offset + done,
                                       dst + done)
                if n == 0:
                    raise OSError("source ended early")
                done += n
        except OSError:
            return False
        self._start_writeback(dst + count)
        return True

    def end(self) -> None:
        """Finish the current tensor.

        Raises:
            RuntimeError: the byte count does not match dtype and shape (a bug).
        """
        assert self._current is not None
        name, dtype, shape, start, hasher = self._current
        expected = math.prod(shape) * torch_dtype(dtype).itemsize
        if self._pos - start != expected:
            raise RuntimeError(f"{name}: wrote {self._pos - start} bytes, expected {expected}")
        self._entries[name] = {"dtype": dtype, "shape": list(shape),
                               "data_offsets": [start, self._pos]}
        if hasher is not None:  # runs after this tensor's writes, in the writer thread
            self._submit(self._finish_hash, name, hasher)
        self._current = None

    def reserve(self, name: str, dtype: str, shape: Sequence[int]) -> int:
        """Claim the next bytes for tensor ``name`` and return their file offset; the
        caller fills them with :meth:`write_at`, from any thread, before :meth:`close`.

        Raises:
            RuntimeError: the writer hashes tensors (that needs the bytes in order).
        """
        if self.hash_tensors:
            raise RuntimeError("reserve() needs a writer without hash_tensors")
        self.begin(name, dtype, shape)
        offset = 8 + self.reserved + self._pos
        self._pos += math.prod(shape) * torch_dtype(dtype).itemsize
        self.end()
        return offset

    def write_at(self, offset: int, data: torch.Tensor) -> None:
        """Write ``data``'s bytes at file ``offset``, inside a range from :meth:`reserve`
        (thread-safe: ``pwrite`` has no shared file position), then start their
        writeback."""
        self.write_bytes_at(offset, byte_view(data.detach().contiguous()))

    def write_bytes_at(self, offset: int, view: memoryview) -> None:
        """:meth:`write_at` for bytes already in a buffer."""
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        if self.sync and _sync_file_range is not None:
            _sync_file_range(self._fd, offset, len(view), _SYNC_FILE_RANGE_WRITE)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        self.begin(name, TORCH_TO_ST[tensor.dtype], tuple(tensor.shape))
        if tensor.numel():
            self.write(tensor)
        self.end()

    def close(self) -> WrittenShard:
        """Wait for the writes, write the header, fsync and close."""
        if self._current is not None:
            raise RuntimeError(f"tensor {self._current[0]} not finished")
        try:
            self._drain()
            header = _header_bytes(self._entries, self.metadata)
            if len(header) > self.reserved:  # not expected: shift the data to make room
                self._shift(len(header))
            blob = struct.pack("<Q", self.reserved) + header + b" " * (self.reserved - len(header))
            written = 0
            while written < len(blob):
                written += os.pwrite(self._fd, blob[written:], written)
            os.ftruncate(self._fd, 8 + self.reserved + self._pos)
            if self.sync:
                os.fsync(self._fd)
        finally:
            self.abort()
        tensors = {n: (e["dtype"], tuple(e["shape"])) for n, e in self._entries.items()}
        return WrittenShard(self.path.name, tensors, self._pos, dict(self._hashes))

    def _shift(self, header_len: int) -> None:
        new_reserved = header_len + (-(8 + header_len)) % 8
        delta = new_reserved - self.reserved
        pos = 8 + self.reserved + self._pos
        while pos > 8 + self.reserved:  # backwards, so nothing is overwritten early
            n = min(CHUNK_BYTES, pos - (8 + self.reserved))
            pos -= n
            os.pwrite(self._fd, os.pread(self._fd, n, pos), pos + delta)
        self.reserved = new_reserved

    def abort(self) -> None:
        """Stop the writer thread and close the file (idempotent; errors of queued
        writes are dropped: the caller is already failing or has drained them)."""
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

