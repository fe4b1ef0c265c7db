"""Runs validated jobs on the backend, off the event loop, batching compatible requests into one launch.

A `Job` holds one request's tensors (host memory), parameters and deadline. `Scheduler.run(job)`
queues it; jobs with equal `Job.batch_key()` are concatenated along the packed token axis (with
shifted `cu_seqlens`) and computed by one backend call, and the outputs are split back per job.

When a batch launches (whichever comes first):
  * its tokens reached `batch_tokens` (a job that would overflow the budget starts the next batch),
  * its oldest job has waited `batch_delay_us` and a compute worker is free (while every worker is
    busy the batch keeps growing: waiting for a worker costs nothing extra),
  * a member's deadline is closer than the batch delay (batching never holds a job past its deadline;
    a job whose deadline has passed when its batch launches is failed with DEADLINE_EXCEEDED alone).
`batch_tokens=0` turns batching off: one request per launch.

Failure isolation: validation runs before the scheduler; if a batched launch still fails, each member
is retried alone, so only the request that breaks the backend fails.

Compute runs on `workers` threads (torch releases the GIL). On CUDA each worker thread has its own
host-to-device, compute and device-to-host streams, so one batch's copies overlap another batch's
compute; inputs arrive in pinned staging buffers (`Scheduler.allocate`, given to the wire's
TensorAssembler and the shared-memory reader) and outputs return into pinned buffers, so every tensor
crosses the bus once each way. `Scheduler.stats` counts launches, requests and full-size copies."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Dict, List, Optional

import grpc
import numpy as np
import torch

from . import metrics
from .backends.base import AttentionParams, Backend
from .validation import RequestError, Shapes

log = logging.getLogger(__name__)


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
    # Run on the compute worker right before / after the launch, so the event loop spends no executor hop on
    # them (e.g. reading inputs from shared memory, writing outputs into it). A failure fails this job alone.
    prepare: Optional[Callable[[], None]] = None
    finish: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None
    output_descs: Optional[list] = None  # set by a `finish` that wrote the outputs into shared memory
    # On CUDA: (name, device tensor) -> a page-locked host tensor to copy that output into (a slice of the
    # client's shared-memory region), or None for staging. Lets the result skip the staging copy.
    output_dest: Optional[Callable[[str, torch.Tensor], Optional[torch.Tensor]]] = None

    def batch_key(self):
        """Jobs with equal keys may share one kernel launch."""
        s, p = self.shapes, self.params
        return (self.op, s.dtype, s.heads_q, s.heads_k, s.head_dim, p.causal, p.softmax_scale, p.window_left,
                p.window_right, p.softcap, p.dropout_p, p.deterministic, self.return_softmax,
                "alibi_slopes" in self.tensors)

    def batchable(self) -> bool:
        # Dropout is never batched: the dropout RNG counter of a sequence is derived from its index in
        # the packed batch (Philox subsequence b * heads + h, see csrc/common/dropout.cuh and
        # backends/philox.py), so shifting a request's sequences behind another request's would change
        # its dropout mask (and the backward pass, which regenerates the mask, would need the same shift).
        # return_softmax is not batched either: S_dmask is padded to the batch's longest sequence, so
        # splitting it back would cost a full copy of a debug-only output.
        return self.params.dropout_p == 0 and not self.return_softmax

    def tokens(self) -> int:
        s = self.shapes
        return (s.total_q + s.total_k) if s is not None else 0


# ---- one launch ---------------------------------------------------------------------------------
class Stats:
    """Counters the tests and benchmarks read (also exported as Prometheus metrics)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.launches = 0  # backend calls (kernel launches), failed ones included
        self.requests = 0  # jobs computed successfully
        self.batched_launches = 0  # launches that served more than one request
        self.retried = 0  # members of a failed batch retried alone
        self.h2d_copies = 0  # full-size host-to-device tensor copies
        self.d2h_copies = 0  # full-size device-to-host tensor copies
        self.host_copies = 0  # full-size host-memory copies made by the scheduler (CPU batching: concat)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().cpu()


class _Streams(threading.local):
    """Per worker thread: (h2d, compute, d2h) CUDA streams, created on first use."""

    def get(self, device: torch.device):
        s = getattr(self, "streams", None)
        if s is None:
            s = self.streams = tuple(torch.cuda.Stream(device) for _ in range(3))
        return s


_STREAMS = _Streams()
_GPU_WAIT = metrics.WORKER_SECONDS.labels("gpu_wait")
_BUSY = metrics.WORKER_SECONDS.labels("busy")
_CPU = metrics.WORKER_SECONDS.labels("cpu")


def _call_backend(backend: Backend, op: str, x: Dict[str, torch.Tensor], params: AttentionParams,
                  return_softmax: bool) -> Dict[str, torch.Tensor]:
    if op == "forward":
        res = backend.forward(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"], params,
                              x.get("alibi_slopes"), return_softmax)
        outputs = {"out": res.out, "softmax_lse": res.softmax_lse}
        if return_softmax:
            outputs["s_dmask"] = res.s_dmask
        return outputs
    res = backend.backward(x["dout"], x["q"], x["k"], x["v"], x["out"], x["softmax_lse"], x["cu_seqlens_q"],
                           x["cu_seqlens_k"], params, x.get("alibi_slopes"))
    return {"dq": res.dq, "dk": res.dk, "dv": res.dv}


_TOKEN_AXIS = {"softmax_lse": 1}  # every other per-token tensor is packed along dim 0
_PER_SEQUENCE = ("cu_seqlens_q", "cu_seqlens_k", "alibi_slopes")


def _pieces(jobs: List[Job]) -> Dict[str, List[torch.Tensor]]:
    """Per tensor name, the members' pieces in concatenation order (cu_seqlens shifted, alibi 2-D)."""
    names = [n for n in jobs[0].tensors if n not in _PER_SEQUENCE]
    out = {n: [j.tensors[n] for j in jobs] for n in names}
    for name, total in (("cu_seqlens_q", "total_q"), ("cu_seqlens_k", "total_k")):
        pieces, shift = [], 0
        for i, j in enumerate(jobs):
            cu = j.tensors[name].to(torch.int32)
            pieces.append((cu if i == 0 else cu[1:]) + shift)
            shift += getattr(j.shapes, total)
        out[name] = pieces
    if "alibi_slopes" in jobs[0].tensors:
        # (heads,) slopes apply to every sequence of their request: expand to (batch, heads) rows
        out["alibi_slopes"] = [j.tensors["alibi_slopes"].reshape(-1, j.shapes.heads_q).expand(j.shapes.batch, -1)
                               for j in jobs]
    return out


def _merged_params(jobs: List[Job]) -> AttentionParams:
    return dataclasses.replace(jobs[0].params, max_seqlen_q=max(j.params.max_seqlen_q for j in jobs),
                               max_seqlen_k=max(j.params.max_seqlen_k for j in jobs))


def _split(jobs: List[Job], outputs: Dict[str, torch.Tensor], host: bool = True) -> List[Dict[str, torch.Tensor]]:
    """Per job, its slice of every output (views along dim 0; on the host lse is made contiguous: it is small;
    device slices stay views, their copy to the host makes them contiguous)."""
    results = []
    q0 = k0 = 0
    for j in jobs:
        q1, k1 = q0 + j.shapes.total_q, k0 + j.shapes.total_k
        res = {}
        for name, t in outputs.items():
            if name == "softmax_lse":
                res[name] = t[:, q0:q1].contiguous() if host else t[:, q0:q1]
            elif name in ("dk", "dv"):
                res[name] = t[k0:k1]
            else:
                res[name] = t[q0:q1]
        results.append(res)
        q0, k0 = q1, k1
    return results


# On CUDA every torch call that releases the GIL (most do) can leave this worker waiting for the event loop's
# next switch (up to sys.getswitchinterval(), 5 ms): measured on the H200 host, such waits were two thirds of a
# worker's time. So a batch's copies go out as one foreach call each way (the slices they copy to and from are
# made by indexing, which keeps the GIL), not as calls per member tensor.
def _wait(stream) -> None:
    """stream.synchronize(), its wall time counted as the worker's GPU wait."""
    t = time.perf_counter()
    stream.synchronize()
    _GPU_WAIT.inc(time.perf_counter() - t)


_FOREACH_COPY = [hasattr(torch, "_foreach_copy_")]


def _copy_all(dsts: List[torch.Tensor], srcs: List[torch.Tensor]) -> None:
    """dsts[i].copy_(srcs[i], non_blocking=True) for every i, in one torch call where this torch can."""
    if not dsts:
        return
    if _FOREACH_COPY[0]:
        try:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # a torch whose foreach copy refuses mixed devices: one call per tensor
            log.warning("torch._foreach_copy_ failed (%s); copying tensor by tensor from now on", exc)
            _FOREACH_COPY[0] = False
    for d, s in zip(dsts, srcs):
        d.copy_(s, non_blocking=True)


def _device_inputs(jobs: List[Job], dev: torch.device):
    """(batched device inputs by name, destination slices, host sources): one copy per member tensor."""
    x: Dict[str, torch.Tensor] = {}
    dsts: List[torch.Tensor] = []
    srcs: List[torch.Tensor] = []
    first = jobs[0].tensors
    if len(jobs) == 1:
        for name, t in first.items():
            if t.device.type != "cpu":  # already there
                x[name] = t
                continue
            d = x[name] = torch.empty(tuple(t.shape), dtype=t.dtype, device=dev)
            dsts.append(d)
            srcs.append(t)
        return x, dsts, srcs
    for name, t in first.items():
        if name in _PER_SEQUENCE:
            continue
        dim = _TOKEN_AXIS.get(name, 0)
        pieces = [j.tensors[name] for j in jobs]
        sizes = [p.shape[dim] for p in pieces]
        shape = list(t.shape)
        shape[dim] = sum(sizes)
        d = x[name] = torch.empty(shape, dtype=t.dtype, device=dev)
        pos = 0
        for p, m in zip(pieces, sizes):
            dsts.append(d[pos:pos + m] if dim == 0 else d[:, pos:pos + m])
            srcs.append(p)
            pos += m
    # cu_seqlens: shifted on the host as Python ints, one small copy each
    for name, total in (("cu_seqlens_q", "total_q"), ("cu_seqlens_k", "total_k")):
        merged, shift = [0], 0
        for j in jobs:
            merged.extend(v + shift for v in j.tensors[name].tolist()[1:])
            shift += getattr(j.shapes, total)
        host = torch.from_numpy(np.asarray(merged, dtype=np.int32))
        x[name] = torch.empty(len(merged), dtype=torch.int32, device=dev)
        dsts.append(x[name])
        srcs.append(host)
    if "alibi_slopes" in first:
        host = torch.cat(_pieces(jobs)["alibi_slopes"])
        x["alibi_slopes"] = torch.empty(tuple(host.shape), dtype=host.dtype, device=dev)
        dsts.append(x["alibi_slopes"])
        srcs.append(host)
    return x, dsts, srcs


def _pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host buffer (torch's caching host allocator keeps and reuses them)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _host_outputs(jobs: List[Job], outputs: Dict[str, torch.Tensor]):
    """(host outputs: one dict per job, or one for the whole batch; host destinations; device sources). A job whose
    output_dest names a page-locked place gets its slice copied straight there; otherwise a batch's outputs go
    whole into pinned buffers, for `_split` once the copies are done."""
    outputs = {name: t for name, t in outputs.items() if t is not None}
    n = len(jobs)
    direct = any(j.output_dest is not None for j in jobs)
    per_job = _split(jobs, outputs, host=False) if (direct and n > 1) else [outputs]
    dsts: List[torch.Tensor] = []
    srcs: List[torch.Tensor] = []
    hosts = []
    for i, outs in enumerate(per_job):
        dest = jobs[i].output_dest if (direct or n == 1) else None
        host = {}
        for name, t in outs.items():
            dst = None
            if dest is not None:
                try:
                    dst = dest(name, t)
                except Exception:  # noqa: BLE001 - the job's finish reports what is wrong with its region
                    dst = None
            if dst is None:
                dst = _pinned_empty(tuple(t.shape), t.dtype)
            host[name] = dst
            dsts.append(dst)
            srcs.append(t)
        hosts.append(host)
    return hosts, dsts, srcs


def _execute_cuda(backend: Backend, jobs: List[Job], stats: Stats) -> List[Dict[str, torch.Tensor]]:
    dev = backend.device
    h2d, comp, d2h = _STREAMS.get(dev)
    t0 = time.perf_counter()
    # -- copy in: one copy of each member tensor, straight into its slice of the batched tensor. Always
    # non_blocking: from pinned memory that is asynchronous; from pageable memory CUDA stages the bytes before
    # returning, so it is safe too (and asking is_pinned() costs a driver call per tensor).
    with torch.cuda.stream(h2d):
        x, dsts, srcs = _device_inputs(jobs, dev)
        _copy_all(dsts, srcs)
    stats.add(h2d_copies=len(srcs))
    params = jobs[0].params if len(jobs) == 1 else _merged_params(jobs)
    _wait(h2d)  # copy-in time is measured; the compute stream then starts from ready inputs
    comp.wait_stream(h2d)
    t1 = time.perf_counter()
    # -- compute: one launch (counted when attempted; requests count when it succeeds)
    stats.add(launches=1)
    metrics.LAUNCHES.inc()
    with torch.cuda.stream(comp):
        outputs = _call_backend(backend, jobs[0].op, x, params, jobs[0].return_softmax)
    _wait(comp)
    stats.add(requests=len(jobs), batched_launches=int(len(jobs) > 1))
    t2 = time.perf_counter()
    # -- copy out: one device-to-host copy per output (per member where members name their places)
    with torch.cuda.stream(d2h):
        d2h.wait_stream(comp)
        hosts, dsts, srcs = _host_outputs(jobs, outputs)
        _copy_all(dsts, srcs)
    _wait(d2h)
    stats.add(d2h_copies=len(srcs))
    results = hosts if len(hosts) == len(jobs) else _split(jobs, hosts[0])  # split only once the bytes are there
    _record_timings(jobs, t0, t1, t2)
    return results


def _execute_host(backend: Backend, jobs: List[Job], stats: Stats) -> List[Dict[str, torch.Tensor]]:
    t0 = time.perf_counter()
    if len(jobs) == 1:
        x, params = jobs[0].tensors, jobs[0].params
    else:
        x = {}
        for name, pieces in _pieces(jobs).items():
            x[name] = torch.cat(pieces, dim=_TOKEN_AXIS.get(name, 0))
            if name not in _PER_SEQUENCE:
                stats.add(host_copies=len(pieces))
        params = _merged_params(jobs)
    t1 = time.perf_counter()
    stats.add(launches=1)
    metrics.LAUNCHES.inc()
    outputs = _call_backend(backend, jobs[0].op, x, params, jobs[0].return_softmax)
    stats.add(requests=len(jobs), batched_launches=int(len(jobs) > 1))
    t2 = time.perf_counter()
    host = {name: _to_host(t) for name, t in outputs.items() if t is not None}
    results = [host] if len(jobs) == 1 else _split(jobs, host)
    _record_timings(jobs, t0, t1, t2)
    return results


def _record_timings(jobs: List[Job], t0: float, t1: float, t2: float) -> None:
    t3 = time.perf_counter()
    for j in jobs:
        j.timings.update(copy_in_s=t1 - t0, compute_s=t2 - t1, copy_out_s=t3 - t2, batch_requests=len(jobs))


def execute_batch(backend: Backend, jobs: List[Job], stats: Optional[Stats] = None) -> List[Dict[str, torch.Tensor]]:
    """Compute jobs of one batch key with one backend call; outputs in host memory, one dict per job.

    Timings (copy_in_s, compute_s, copy_out_s, batch_requests) are recorded on every job."""
    stats = stats or Stats()
    try:
        if backend.device.type == "cuda":
            results = _execute_cuda(backend, jobs, stats)
        else:
            results = _execute_host(backend, jobs, stats)
    except torch.cuda.OutOfMemoryError:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "the GPU ran out of memory for this request; retry later or send less at once") from None
    metrics.BATCH_REQUESTS.observe(len(jobs))
    return results


def execute(backend: Backend, job: Job) -> Dict[str, torch.Tensor]:
    """Compute one job synchronously (no batching); outputs in host memory."""
    return execute_batch(backend, [job])[0]


# ---- the scheduler --------------------------------------------------------------------------------
class _Batch:
    __slots__ = ("key", "entries", "tokens", "due", "full")

    def __init__(self, key, due: float):
        self.key = key
        self.entries: List[tuple] = []  # (job, future, enqueued perf_counter)
        self.tokens = 0
        self.due = due  # monotonic time at which it launches once a worker is free
        self.full = False


class Scheduler:
    """Batches compatible jobs; at most `workers` launches run at once."""

    def __init__(self, backend: Backend, workers: int = 2, batch_tokens: int = 0, batch_delay_us: int = 0,
                 pinned: Optional[bool] = None):
        self.backend = backend
        self.workers = max(1, workers)
        self.batch_tokens = max(0, int(batch_tokens))
        self.batch_delay_s = max(0, int(batch_delay_us)) / 1e6
        self.stats = Stats()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers,
                                                           thread_name_prefix="flashserve-compute")
        self._free = self.workers
        self._queue: "collections.OrderedDict[int, _Batch]" = collections.OrderedDict()  # FIFO of batches
        self._open: Dict[object, _Batch] = {}  # batches still accepting jobs, by key
        self._ids = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False
        self._active = 0  # jobs inside the scheduler (queued or computing)
        # Requests the server is handling in all (set by the app to the service's in-flight count). When every
        # one of them is already inside the scheduler, no batch-mate can be on its way: launch without delay.
        self.upstream: Optional[Callable[[], int]] = None
        if pinned is None:
            pinned = backend.device.type == "cuda"
        # Pinned staging: torch's caching host allocator is the pool (freed blocks are cached and
        # reused, and stream-ordered copies keep a block alive until they finish).
        self.allocate: Optional[Callable[[int], torch.Tensor]] = self._allocate_pinned if pinned else None

    def _allocate_pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @property
    def batching(self) -> bool:
        return self.batch_tokens > 0

    async def run(self, job: Job) -> Dict[str, torch.Tensor]:
        if self._closed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        now = time.monotonic()
        entry = (job, fut, time.perf_counter())
        tokens = job.tokens()
        key = job.batch_key() if (self.batching and job.batchable()) else None
        batch = self._open.get(key) if key is not None else None
        if batch is not None and batch.tokens + tokens > self.batch_tokens:
            batch.full = True  # the newcomer would overflow it: it launches, the newcomer opens the next
            del self._open[key]
            batch = None
        if batch is None:
            batch = _Batch(key, now + (self.batch_delay_s if key is not None else 0.0))
            self._ids += 1
            self._queue[self._ids] = batch
            if key is not None:
                self._open[key] = batch
        batch.entries.append(entry)
        batch.tokens += tokens
        if job.deadline is not None:  # never hold a job past its deadline (keep a delay's worth of slack)
            batch.due = min(batch.due, job.deadline - self.batch_delay_s)
        if key is not None and batch.tokens >= self.batch_tokens:
            batch.full = True
            self._open.pop(key, None)
        self._active += 1
        if self.upstream is not None and self.upstream() <= self._active:
            batch.due = now  # nobody else is sending: waiting could only add latency
        self._pump()
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # a member cancelled before launch is skipped at launch
            raise
        finally:
            self._active -= 1

    # -- dispatch, on the event loop
    def _pump(self) -> None:
        now = time.monotonic()
        while self._free > 0 and self._queue:
            ready = None
            for bid, b in self._queue.items():
                if b.full or b.due <= now:
                    ready = bid
                    break
            if ready is None:
                break
            batch = self._queue.pop(ready)
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            self._launch(batch)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._free > 0 and self._queue:
            due = min(b.due for b in self._queue.values())
            self._timer = self._loop.call_later(max(0.0, due - now), self._pump)

    def _launch(self, batch: _Batch) -> None:
        now_mono, now = time.monotonic(), time.perf_counter()
        live = []
        for job, fut, enq in batch.entries:
            if fut.done():  # cancelled while queued
                continue
            job.timings["queue_s"] = now - enq
            if job.deadline is not None and now_mono > job.deadline:
                fut.set_exception(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               "the deadline passed before compute started"))
                continue
            live.append((job, fut))
        if not live:
            return
        self._free -= 1
        jobs = [j for j, _ in live]
        cf = self._pool.submit(self._compute, jobs)
        cf.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._finished, f, live))

    def _compute(self, jobs: List[Job]) -> List[object]:
        """Worker thread: each job's `prepare`, one launch, each job's `finish`; per job its outputs or the
        exception that failed it (a failing member never fails its batch-mates)."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            return self._compute_jobs(jobs)
        finally:
            _BUSY.inc(time.perf_counter() - wall0)
            _CPU.inc(time.thread_time() - cpu0)

    def _compute_jobs(self, jobs: List[Job]) -> List[object]:
        results: List[object] = [None] * len(jobs)
        ready = []
        for i, j in enumerate(jobs):
            try:
                if j.prepare is not None:
                    t0 = time.perf_counter()
                    prepare, j.prepare = j.prepare, None  # it may reference the job: no cycle outlives the call
                    prepare()
                    j.timings["receive_s"] = j.timings.get("receive_s", 0.0) + time.perf_counter() - t0
                ready.append(i)
            except Exception as exc:  # noqa: PERF203 - one failure per bad member
                results[i] = exc
        launched = self._launch_batch([jobs[i] for i in ready]) if ready else []
        for i, res in zip(ready, launched):
            if jobs[i].finish is not None and not isinstance(res, BaseException):
                try:
                    t0 = time.perf_counter()
                    finish, jobs[i].finish = jobs[i].finish, None
                    finish(res)
                    jobs[i].timings["copy_out_s"] = jobs[i].timings.get("copy_out_s", 0.0) + time.perf_counter() - t0
                except Exception as exc:  # noqa: PERF203
                    res = exc
            results[i] = res
        return results

    def _launch_batch(self, jobs: List[Job]) -> List[object]:
        """One launch; if a batch fails, each member alone (only the bad one fails)."""
        try:
            return execute_batch(self.backend, jobs, self.stats)
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
        self.stats.add(retried=len(jobs))
        results: List[object] = []
        for j in jobs:
            try:
                results.append(execute_batch(self.backend, [j], self.stats)[0])
            except Exception as exc:  # noqa: PERF203 - one failure per bad member
                results.append(exc)
        return results

    def _finished(self, cf: concurrent.futures.Future, live) -> None:
        self._free += 1
        try:
            results = cf.result()
        except BaseException as exc:  # the pool itself failed
            results = [exc] * len(live)
        for (job, fut), res in zip(live, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        self._pump()

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for batch in list(self._queue.values()):  # launch what is queued, then wait for it
            batch.full = True
        if self._loop is not None and self._queue:
            while self._queue:
                self._pump()
                if self._queue:
                    await asyncio.sleep(0.001)
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
