"""Residuals kept on the server between a Forward and its Backward (training).

A Forward with `keep_residuals` stores q, k, v, out, softmax_lse, cu_seqlens (and ALiBi slopes) plus
the parameters that fix the result (softmax scale, causal, window, softcap, dropout seed and offset:
the RNG state) under a random handle; a Backward naming the handle then sends only dout.

The store is bounded by a byte budget and a time-to-live: expired sets go first, then the least
recently used, until a new set fits. A set bigger than the whole budget is not kept (the Forward
returns no handle and the client sends everything on Backward). A Backward whose handle is gone gets
FAILED_PRECONDITION with a message naming the residuals; the client then resends the tensors, so
correctness never depends on the cache. Release frees a handle's bytes at once.

All methods are called on the server's event loop; a lock makes them safe from other threads too."""
from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time
from typing import Dict, Iterable, Optional

import grpc
import torch

from . import metrics
from .backends.base import AttentionParams
from .validation import RequestError, Shapes

KEPT_INPUTS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes")
KEPT_OUTPUTS = ("out", "softmax_lse")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a compact copy when it is a view into a larger buffer (a batch's output, a staging
    block) so that the budget counts the bytes really held."""
    if t.untyped_storage().nbytes() > _nbytes(t) or not t.is_contiguous():
        return t.contiguous().clone()
    return t


@dataclasses.dataclass
class Kept:
    tensors: Dict[str, torch.Tensor]
    shapes: Shapes
    params: AttentionParams
    nbytes: int
    expires: float

    def merge_params(self, params: AttentionParams) -> AttentionParams:
        """The forward's parameters (scale, mask, dropout seed/offset, max_seqlen) with the backward's
        own choice of deterministic mode."""
        return dataclasses.replace(self.params, deterministic=params.deterministic)


def evicted(handle: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"residual_handle: the residuals kept under '{handle[:16]}' were evicted, released or never "
                        "existed on this server; send q, k, v, out and softmax_lse with dout")


class ResidualStore:
    def __init__(self, budget_bytes: int, ttl_s: float, clock=time.monotonic):
        self.budget_bytes = int(budget_bytes)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._items: "collections.OrderedDict[str, Kept]" = collections.OrderedDict()  # oldest use first
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, handle: str) -> bool:
        with self._lock:
            self._expire()
            return handle in self._items

    def keep(self, job, outputs: Dict[str, torch.Tensor]) -> str:
        """Keep a forward job's residuals; returns the handle, or "" when they do not fit the budget."""
        tensors = {n: job.tensors[n] for n in KEPT_INPUTS if n in job.tensors}
        tensors.update({n: outputs[n] for n in KEPT_OUTPUTS})
        size = sum(_nbytes(t) for t in tensors.values())
        if size > self.budget_bytes or job.shapes is None:
            return ""
        tensors = {n: _own(t) for n, t in tensors.items()}
        handle = secrets.token_hex(16)
        with self._lock:
            self._expire()
            while self._items and self.used_bytes + size > self.budget_bytes:
                self._drop(next(iter(self._items)), "budget")
            self._items[handle] = Kept(tensors, job.shapes, job.params, size, self._clock() + self.ttl_s)
            self.used_bytes += size
            metrics.RESIDUAL_BYTES.set(self.used_bytes)
        return handle

    def take(self, handle: str) -> Kept:
        """The residuals under handle (kept until released or evicted: a graph may run backward twice)."""
        with self._lock:
            self._expire()
            kept = self._items.get(handle)
            if kept is None:
                raise evicted(handle)
            self._items.move_to_end(handle)
            kept.expires = self._clock() + self.ttl_s
            return kept

    def head_dim(self, handle: str) -> int:
        with self._lock:
            self._expire()
            kept = self._items.get(handle)
        if kept is None:
            raise evicted(handle)
        return kept.shapes.head_dim

    def release(self, handles: Iterable[str]) -> int:
        released = 0
        with self._lock:
            for h in handles:
                if h in self._items:
                    self._drop(h, None)
                    released += 1
            metrics.RESIDUAL_BYTES.set(self.used_bytes)
        return released

    def _expire(self) -> None:
        now = self._clock()
        for h in [h for h, k in self._items.items() if k.expires <= now]:
            self._drop(h, "ttl")

    def _drop(self, handle: str, reason: Optional[str]) -> None:
        kept = self._items.pop(handle)
        self.used_bytes -= kept.nbytes
        if reason is not None:
            self.evictions += 1
            metrics.RESIDUAL_EVICTIONS.labels(reason).inc()
        metrics.RESIDUAL_BYTES.set(self.used_bytes)
