"""Reusable host buffers for tensors a client hands back to its caller.

Every result a call returns lands in a CPU buffer. A fresh multi-megabyte `torch.empty` costs a page
fault per 4 KiB page when first written (on a 2-core test machine filling a fresh 64 MB buffer takes
~15 ms, a warm one ~3 ms), more than the copy itself. So the client keeps the buffers it handed out and
reuses one once the caller has dropped every tensor on it.

Safety: a buffer is reused only when nothing but the pool references its storage (the storage's use
count counts every tensor and view on it; a numpy array made from a tensor keeps that tensor alive).
A result the caller still holds is never overwritten."""
from __future__ import annotations

import threading
from typing import List

import torch

MIN_POOLED_BYTES = 1 << 20  # smaller buffers are cheap to fault in


def storage_use_count(buf: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)


def _idle(buf: torch.Tensor) -> bool:
    # one reference from the pool's own tensor and one from the temporary storage object of the check
    return storage_use_count(buf) == 2


class RecyclingPool:
    """Buffers lent to callers, reused by exact size once idle.

    At most `max_idle_bytes` of idle buffers are kept (oldest dropped first), and at most `max_tracked_bytes`
    are tracked in all; beyond that, buffers are plain untracked allocations."""

    def __init__(self, max_idle_bytes: int = 512 << 20, max_tracked_bytes: int = 2 << 30):
        self.max_idle_bytes = max_idle_bytes
        self.max_tracked_bytes = max_tracked_bytes
        self._bufs: List[torch.Tensor] = []  # least recently lent first
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of nbytes (contents undefined), a view of a pooled buffer when one is idle."""
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            idle = [i for i, b in enumerate(self._bufs) if _idle(b)]
            for i in idle:
                if self._bufs[i].numel() == nbytes:
                    buf = self._bufs.pop(i)
                    self._bufs.append(buf)
                    self.hits += 1
                    return buf[:]  # a view: the pool's own tensor object never leaves the pool
            self.misses += 1
            idle_bytes = sum(self._bufs[i].numel() for i in idle)
            tracked = sum(b.numel() for b in self._bufs)
            drop = set()
            for i in idle:  # oldest idle first, until both bounds hold with the new buffer
                if idle_bytes <= self.max_idle_bytes and tracked + nbytes <= self.max_tracked_bytes:
                    break
                drop.add(i)
                idle_bytes -= self._bufs[i].numel()
                tracked -= self._bufs[i].numel()
            if drop:
                self._bufs = [b for i, b in enumerate(self._bufs) if i not in drop]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if tracked + nbytes <= self.max_tracked_bytes:
                self._bufs.append(buf)
            return buf[:]

    def tracked_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._bufs)

    def clear(self) -> None:
        with self._lock:
            self._bufs = []
