"""Reusable host receive buffers (CPU servers).

A fresh multi-megabyte `torch.empty` costs a page fault per 4 KiB page the first time it is written: on
the bench machine filling a fresh 64 MB buffer takes ~16 ms against ~3 ms for a warm one, more than the
copy itself. Receive buffers are therefore taken from a small pool keyed by exact size (repeated shapes
are the common case; exact sizes also keep kept residuals from being compacted by a copy) and given
back when the call ends.

Safety: a buffer goes back into the pool only when nothing but the pool references its storage (checked
with the storage's use count, which counts every tensor and view on it, numpy arrays included). A buffer
still held by anyone (kept residuals, a compute thread of a cancelled call, an output that aliases an
input) is simply left to the garbage collector, so a pooled buffer is never handed to two live calls and
nothing a call hands out can alias a buffer that is reused."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List

import torch

MIN_POOLED_BYTES = 1 << 20  # smaller buffers are cheap to fault in


def _use_count(buf: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)


class BufferPool:
    """Idle uint8 CPU buffers, at most `max_bytes` of them, least recently returned dropped first."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._idle: "OrderedDict[int, List[torch.Tensor]]" = OrderedDict()
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.returned = self.refused = 0

    def lease(self) -> "Lease":
        return Lease(self)

    def _take(self, size: int) -> torch.Tensor:
        with self._lock:
            bufs = self._idle.get(size)
            if bufs:
                buf = bufs.pop()
                if not bufs:
                    del self._idle[size]
                self._idle_bytes -= size
                self.hits += 1
                return buf
            self.misses += 1
        return torch.empty(size, dtype=torch.uint8)

    def _give(self, buf: torch.Tensor) -> None:
        size = buf.numel()
        if size > self.max_bytes:
            return
        # one reference from `buf` itself and one from the temporary storage object of the check
        if _use_count(buf) != 2:
            self.refused += 1
            return
        with self._lock:
            while self._idle and self._idle_bytes + size > self.max_bytes:
                old_size, old = next(iter(self._idle.items()))
                old.pop(0)
                if not old:
                    del self._idle[old_size]
                self._idle_bytes -= old_size
            self._idle.setdefault(size, []).append(buf)
            self._idle.move_to_end(size)
            self._idle_bytes += size
            self.returned += 1


class Lease:
    """The buffers of one call: `allocate(n)` for the wire's TensorAssembler, `release()` when it ends."""

    def __init__(self, pool: BufferPool):
        self._pool = pool
        self._bufs: List[torch.Tensor] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = self._pool._take(nbytes)
        self._bufs.append(buf)
        return buf[:]  # a view: the pool's own tensor object never leaves the lease

    def release(self) -> None:
        """Give back the buffers nobody else holds. Call after dropping the call's own references."""
        bufs, self._bufs = self._bufs, []
        while bufs:
            self._pool._give(bufs.pop())
