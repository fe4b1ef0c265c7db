"""Runs validated jobs on the backend, off the event loop.

A `Job` holds one request's tensors (host memory), parameters and deadline; `Scheduler.run`
moves the tensors to the backend's device, computes, and brings the outputs back to host memory,
recording where the time went. Compute runs on a small thread pool: torch releases the GIL, so
the event loop keeps receiving other requests meanwhile."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Dict, Optional

import torch

from .backends.base import AttentionParams, Backend
from .validation import RequestError, Shapes

import grpc


@dataclasses.dataclass
class Job:
    op: str  # "forward" or "backward"
    tensors: Dict[str, torch.Tensor]
    params: AttentionParams
    shapes: Shapes
    return_softmax: bool = False
    deadline: Optional[float] = None  # time.monotonic() by which the caller gives up
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    created: float = dataclasses.field(default_factory=time.monotonic)

    def batch_key(self):
        """Jobs with equal keys may share one kernel launch."""
        s, p = self.shapes, self.params
        return (self.op, s.dtype, s.heads_q, s.heads_k, s.head_dim, p.causal, p.softmax_scale, p.window_left,
                p.window_right, p.softcap, p.dropout_p, p.deterministic, self.return_softmax,
                "alibi_slopes" in self.tensors)


def _to_device(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=t.is_pinned())


def _to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().cpu()


def execute(backend: Backend, job: Job) -> Dict[str, torch.Tensor]:
    """Compute one job synchronously; outputs in host memory."""
    dev = backend.device
    t0 = time.perf_counter()
    x = {name: _to_device(t, dev) for name, t in job.tensors.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    try:
        if job.op == "forward":
            res = backend.forward(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"], job.params,
                                  x.get("alibi_slopes"), job.return_softmax)
            outputs = {"out": res.out, "softmax_lse": res.softmax_lse}
            if job.return_softmax:
                outputs["s_dmask"] = res.s_dmask
        else:
            res = backend.backward(x["dout"], x["q"], x["k"], x["v"], x["out"], x["softmax_lse"], x["cu_seqlens_q"],
                                   x["cu_seqlens_k"], job.params, x.get("alibi_slopes"))
            outputs = {"dq": res.dq, "dk": res.dk, "dv": res.dv}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except torch.cuda.OutOfMemoryError:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "the GPU ran out of memory for this request; retry later or send less at once") from None
    t2 = time.perf_counter()
    host = {name: _to_host(t) for name, t in outputs.items()}
    t3 = time.perf_counter()
    job.timings.update(copy_in_s=t1 - t0, compute_s=t2 - t1, copy_out_s=t3 - t2)
    return host


class Scheduler:
    """One job per launch; concurrency bounded by the thread pool."""

    def __init__(self, backend: Backend, workers: int = 2):
        self.backend = backend
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="flashserve-compute")

    async def run(self, job: Job) -> Dict[str, torch.Tensor]:
        loop = asyncio.get_running_loop()
        queued = time.perf_counter()

        def work():
            job.timings["queue_s"] = time.perf_counter() - queued
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before compute started")
            return execute(self.backend, job)

        result = await loop.run_in_executor(self._pool, work)
        job.timings["batch_requests"] = 1
        return result

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
