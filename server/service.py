"""The gRPC service: decodes frames, validates, hands jobs to the scheduler, streams results back.

Every failure is a gRPC status on that call alone; the server keeps serving everyone else."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
import socket
import time
from typing import AsyncIterator, Dict, Optional

import grpc
import torch

from flashserve.proto import attention_pb2 as pb
from flashserve.proto import attention_pb2_grpc as pb_grpc
from flashserve.wire import (TORCH_TO_PROTO, TensorAssembler, WireError, chunk_count, chunk_pieces, chunk_size_for,
                             copy_pieces, decode_frame, describe, encode_chunk, encode_frame, iter_encoded)

from . import metrics
from .chunks import ChunkCopier
from .pool import BufferPool
from .backends.base import Backend
from .config import ServerConfig
from .scheduler import Job, Scheduler
from .shm import is_memfd_name
from .validation import RequestError, attention_params, check_contents, check_header

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Attention"].full_name

METHOD_NAMES = {pb.FORWARD: "Forward", pb.BACKWARD: "Backward"}
# Chunks at least this large are copied into their tensors (and response chunks encoded) on helper threads,
# so the event loop goes on receiving (sending) while they are copied; smaller ones are not worth the hop.
OFFLOAD_BYTES = 1 << 20
COPIES_AHEAD = 4  # chunk copies of one call in flight at once
REPLY_ENCODE_AHEAD = 3  # reply chunks encoded ahead of the sender (H200 host, 256 MB replies: 4% faster than 1)
INLINE_SHM_BYTES = 64 << 10  # shared-memory tensors up to this size are read on the event loop
VALUE_CHECKED = ("cu_seqlens_q", "cu_seqlens_k", "alibi_slopes")  # read before validation, whatever their size


@functools.lru_cache(maxsize=None)
def _child(metric, *labels):
    """A labelled metric's child, looked up once (labels() costs a lock and a dict walk per call)."""
    return metric.labels(*labels)


def _read_deferred(job: Job, read, header: pb.Header, allocate, names) -> None:
    """Job.prepare: the large shared-memory inputs, read on the compute worker."""
    job.tensors.update(read(header, allocate, names=names))


def set_timings(reply: pb.Header, t: Dict[str, float]) -> None:
    """A job's stage times into its reply (and the stage histograms)."""
    reply.timings.CopyFrom(pb.Timings(queue_s=t.get("queue_s", 0), copy_in_s=t.get("copy_in_s", 0),
                                      compute_s=t.get("compute_s", 0), copy_out_s=t.get("copy_out_s", 0),
                                      receive_s=t.get("receive_s", 0),
                                      batch_requests=int(t.get("batch_requests", 1))))
    for stage in ("queue_s", "copy_in_s", "compute_s", "copy_out_s"):
        _child(metrics.STAGE, stage[:-2]).observe(t.get(stage, 0))


class CallResources:
    """What one call holds until it ends: a receive-buffer lease (CPU), page-locked shared-memory regions its
    GPU copies use, and the bytes it reserved against --max-inflight-bytes."""
    __slots__ = ("lease", "holds", "admitted")

    def __init__(self, lease=None):
        self.lease = lease
        self.holds: list = []
        self.admitted = [0]


async def _one(frame: pb.Frame):
    yield frame


def add_to_server(service: "AttentionService", server) -> None:
    """Like pb_grpc.add_AttentionServicer_to_server, with the fast frame codec for Forward / Backward
    (chunk frames arrive as views, and pre-encoded frames are sent as they are)."""
    handlers = {
        "Forward": grpc.stream_stream_rpc_method_handler(service.Forward, request_deserializer=decode_frame,
                                                         response_serializer=encode_frame),
        "Backward": grpc.stream_stream_rpc_method_handler(service.Backward, request_deserializer=decode_frame,
                                                          response_serializer=encode_frame),
        "Call": grpc.unary_unary_rpc_method_handler(service.Call, request_deserializer=pb.Header.FromString,
                                                    response_serializer=pb.Header.SerializeToString),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo, request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.ServerInfo.SerializeToString),
        "Release": grpc.unary_unary_rpc_method_handler(
            service.Release, request_deserializer=pb.ReleaseRequest.FromString,
            response_serializer=pb.ReleaseResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class AttentionService(pb_grpc.AttentionServicer):
    def __init__(self, backend: Backend, config: ServerConfig, scheduler: Optional[Scheduler] = None,
                 residuals=None, shm=None):
        self.backend = backend
        self.config = config
        self.caps = backend.capabilities()
        self.scheduler = scheduler or Scheduler(backend, config.workers)
        self.residuals = residuals  # server/residuals.py store, or None
        self.shm = shm  # server/shm.py reader/writer when --allow-shm, or None
        self.in_flight = 0
        self.inflight_bytes = 0  # tensor bytes admitted by calls now in flight (--max-inflight-bytes)
        self.requests_served = 0  # Forward/Backward calls answered OK
        # CPU receive buffers are reused across calls (no first-touch page faults); on CUDA the scheduler's
        # pinned allocator (torch's caching host allocator) already is a pool.
        self.pool = BufferPool() if getattr(self.scheduler, "allocate", None) is None else None
        self.keeps_residuals = residuals is not None
        # On a front end of `serve --frontends N`: the connection to the GPU process (server/engine.py), which
        # computes; this process only speaks gRPC and validates.
        self.engine = None
        self.chunk_copier = ChunkCopier()
        self.copier = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                                            thread_name_prefix="flashserve-copy")

    # ---- RPC methods -------------------------------------------------------------------------
    async def Forward(self, request_iterator, context) -> AsyncIterator[pb.Frame]:
        async for frame in self._call(pb.FORWARD, request_iterator, context):
            yield frame

    async def Backward(self, request_iterator, context) -> AsyncIterator[pb.Frame]:
        async for frame in self._call(pb.BACKWARD, request_iterator, context):
            yield frame

    async def Call(self, request: pb.Header, context) -> pb.Header:
        """Forward or Backward in one message: every tensor in shared memory, outputs into output_region."""
        if request.operation not in (pb.FORWARD, pb.BACKWARD):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"operation: Call runs FORWARD or BACKWARD, got {request.operation}")
        problem = None
        if self.shm is None:
            problem = "shm: this server does not accept shared-memory tensors (start it with --allow-shm)"
        elif not request.output_region:
            problem = "output_region: Call returns its outputs in shared memory only; name a region"
        else:
            chunked = [d.name for d in request.tensors if not d.HasField("shm")]
            if chunked:
                problem = (f"{chunked[0]}: Call carries no chunk bytes, so every tensor must be a shared-memory "
                           f"slice (use Forward/Backward for {', '.join(chunked)})")
        if problem is not None:
            _child(metrics.REQUESTS, METHOD_NAMES[request.operation], grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        reply = None
        async for frame in self._call(request.operation, _one(pb.Frame(header=request)), context):
            reply = frame.header  # a shared-memory reply is one header frame
        return reply

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        cfg = self.config
        return pb.ServerInfo(
            version=VERSION, backend=self.backend.name, device=self.backend.device_name(),
            dtypes=[TORCH_TO_PROTO[d] for d in self.caps.dtypes], max_head_dim=self.caps.max_head_dim,
            features=list(self.caps.features), backward=self.caps.backward,
            head_dim_classes=list(self.caps.head_dim_classes),
            limits=pb.Limits(max_tokens=cfg.max_tokens, max_request_bytes=cfg.max_request_bytes,
                             max_concurrent_requests=cfg.max_concurrent, max_message_bytes=cfg.max_message_bytes,
                             default_chunk_bytes=cfg.chunk_bytes),
            shared_memory=self.shm is not None, residuals=self.keeps_residuals, hostname=socket.gethostname())

    async def Release(self, request, context) -> pb.ReleaseResponse:
        released = 0
        if self.engine is not None:
            try:
                released = await self.engine.release(request.residual_handles)
            except RequestError as exc:
                await context.abort(exc.code, exc.message)
        elif self.residuals is not None:
            released = self.residuals.release(list(request.residual_handles))
        return pb.ReleaseResponse(released=released)

    # ---- one Forward / Backward call ---------------------------------------------------------
    async def _call(self, operation: int, request_iterator, context) -> AsyncIterator[pb.Frame]:
        method = METHOD_NAMES[operation]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        if self.in_flight >= self.config.max_concurrent:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            _child(metrics.REQUESTS, method, code.name).inc()
            await context.abort(code, f"the server is serving {self.in_flight} requests, its limit "
                                      f"(--max-concurrent); retry later")
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        res = CallResources(self.pool.lease() if self.pool is not None else None)
        tensors = outputs = job = None
        try:
            header, tensors, shapes, params, received_s, large = await self._receive(
                operation, request_iterator, res.lease, res.admitted, res.holds)
            remaining = context.time_remaining()
            if self.engine is not None:  # a front end: the GPU process computes (server/engine.py)
                reply, outputs, descs, timings = await self.engine.run(operation, header, tensors, shapes, params,
                                                                      large, received_s, remaining, self.in_flight)
            else:
                reply, outputs, job = await self.run_job(operation, header, tensors, shapes, params, received_s,
                                                         large, remaining, res)
                timings, descs = job.timings, job.output_descs
            async for frame in self._send(reply, outputs, header, timings, descs):
                yield frame
            _child(metrics.TOKENS, method).inc(shapes.total_q if shapes else 0)
            self.requests_served += 1
        except RequestError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        except WireError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except torch.cuda.OutOfMemoryError:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, "the GPU ran out of memory for this request")
        except (grpc.aio.AbortError, GeneratorExit):
            raise
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # a bug or backend failure: this call fails, the server goes on
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            tensors = outputs = job = None  # our references go first; buffers anyone else holds stay out of the pool
            self.release_resources(res)
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            _child(metrics.REQUESTS, method, code.name).inc()
            _child(metrics.LATENCY, method).observe(time.perf_counter() - started)

    def release_resources(self, res: "CallResources") -> None:
        self.inflight_bytes -= res.admitted[0]
        res.admitted[0] = 0
        if res.holds:
            self.shm.release(res.holds)
            res.holds = []
        if res.lease is not None:
            res.lease.release()
            res.lease = None

    async def run_job(self, operation: int, header: pb.Header, tensors, shapes, params, received_s: float,
                      large, remaining: Optional[float], res: "CallResources"):
        """Compute a validated request: (reply header, outputs, job). `large`: shared-memory inputs read on the
        compute worker right before the launch. Used by a single-process server's calls and by the GPU process
        of `serve --frontends N` for the requests its front ends hand over."""
        job = Job(op="forward" if operation == pb.FORWARD else "backward", tensors=tensors, params=params,
                  shapes=shapes, return_softmax=header.params.return_softmax and operation == pb.FORWARD,
                  deadline=None if remaining is None else time.monotonic() + remaining)
        job.timings["receive_s"] = received_s
        try:
            if large:
                allocate = res.lease.allocate if res.lease is not None else None
                job.prepare = functools.partial(_read_deferred, job, self.shm.read_inputs, header, allocate, large)
            keeps = operation == pb.FORWARD and header.keep_residuals and self.residuals is not None
            if header.output_region and self.shm is not None and not keeps:
                job.finish = functools.partial(self._write_outputs, job, header)
                job.output_dest = self.shm.output_placer(header, res.holds)
            if operation == pb.BACKWARD and header.residual_handle:
                self._attach_residuals(job, header.residual_handle)
            outputs = await self.scheduler.run(job)
            reply = pb.Header(operation=operation)
            if keeps:
                reply.residual_handle = self.residuals.keep(job, outputs)
            return reply, outputs, job
        finally:
            job.prepare = job.finish = job.output_dest = None  # they reference the job: break the cycle

    def _admit_bytes(self, header: pb.Header, admitted: list) -> None:
        """Reserve the request's tensor bytes against --max-inflight-bytes before any buffer is taken."""
        self.admit(sum(d.nbytes for d in header.tensors), admitted)

    def admit(self, nbytes: int, admitted: list) -> None:
        limit = self.config.max_inflight_bytes
        if self.inflight_bytes + nbytes > limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server holds {self.inflight_bytes} bytes for requests in flight; {nbytes} more "
                               f"would pass its limit of {limit} (--max-inflight-bytes); retry later")
        self.inflight_bytes += nbytes
        admitted[0] = nbytes

    async def _receive(self, operation, request_iterator, lease=None, admitted=None, holds=None):
        # pinned staging on CUDA, pooled buffers on CPU
        asm = TensorAssembler(lease.allocate if lease is not None else getattr(self.scheduler, "allocate", None))
        shapes = params = None
        t_first = None
        loop = asyncio.get_running_loop()
        copies = None  # this call's chunk copies on the helper threads (server/chunks.py), once there is one
        try:
            async for frame in request_iterator:
                kind = frame.WhichOneof("kind")
                if t_first is None:
                    t_first = time.perf_counter()
                    if kind != "header":
                        raise WireError("the first frame must be a header", "header")
                    header = frame.header
                    has_residuals = operation == pb.BACKWARD and bool(header.residual_handle)
                    if has_residuals and not self.keeps_residuals:
                        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                           "residual_handle: this server keeps no residuals; send the tensors")
                    shapes = check_header(header, operation, self.caps, self.config, has_residuals)
                    if shapes is None and self.engine is not None:
                        params = None  # the GPU process holds the residuals: it reads their head dim itself
                    else:
                        head_dim = shapes.head_dim if shapes else self.residuals.head_dim(header.residual_handle)
                        params = attention_params(header, head_dim, self.caps, operation)
                    if admitted is not None:
                        self._admit_bytes(header, admitted)
                    asm.set_header(header)
                elif kind == "chunk":
                    pieces = asm.place(len(frame.chunk))  # claims the chunk's bytes (and checks the count) here
                    if len(frame.chunk) < OFFLOAD_BYTES:
                        copy_pieces(pieces, frame.chunk)
                        continue
                    # the loop goes on receiving while this chunk is copied
                    if copies is None:
                        copies = self.chunk_copier.call(loop)
                    copies.submit(pieces, frame.chunk)
                    if copies.pending > COPIES_AHEAD:
                        await copies.wait(COPIES_AHEAD)
                elif kind == "header":
                    raise WireError("a second header arrived in one stream", "header")
                else:
                    raise WireError("an empty frame arrived", "frame")
        finally:
            if copies is not None:  # never return while a copy still writes into this call's buffers
                await copies.drain()
        if copies is not None and copies.error is not None:
            raise copies.error
        if t_first is None:
            raise WireError("the request stream ended before any header arrived", "header")
        tensors = asm.finish()
        large = set()
        shm_names = {d.name for d in asm.header.tensors if d.HasField("shm")}
        if shm_names:
            got, large = self.shm_inputs(asm.header, shm_names, lease, holds)
            tensors.update(got)
        metrics.BYTES_IN.inc(asm.received_bytes)
        if shapes is not None:
            params = check_contents(tensors, shapes, params)
        return asm.header, tensors, shapes, params, time.perf_counter() - t_first, large

    def shm_inputs(self, header: pb.Header, names, lease=None, holds=None):
        """The shared-memory inputs `names` of a request: (tensors read now, names left for later). Small tensors,
        and those whose values validation checks (cu_seqlens, alibi), are copied here: the checks then see a copy
        the client cannot change. Large ones are checked here and read right before the launch: by the compute
        worker, or, on a front end of `serve --frontends N`, by the GPU process."""
        if self.shm is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "shm: this server does not accept shared-memory tensors (start it with --allow-shm)")
        descs = [d for d in header.tensors if d.HasField("shm") and d.name in names]
        large = {d.name for d in descs if d.nbytes > INLINE_SHM_BYTES and d.name not in VALUE_CHECKED}
        if large and header.residual_handle:  # dout is checked against the kept residuals at once
            large = set()
        keeps = header.keep_residuals and self.keeps_residuals
        # A CPU backend reads the large tensors of a sealed memfd in place (no copy): the client holds that
        # region for the whole call and it cannot shrink; their values only affect the client's own rows.
        # Not when they are kept as residuals past the call. A CUDA backend does the same from regions it could
        # page-lock: the host-to-device copy then reads the client's memory directly (`holds` keeps them pinned
        # until the call ends). A front end (no backend here) only checks them.
        borrow = set()
        if large and self.engine is None and (lease is not None or self.shm.pinner is not None) and not keeps:
            borrow = {d.name for d in descs if d.name in large and is_memfd_name(d.shm.region)}
        pinned = lease is None and self.shm.pinner is not None  # CUDA: borrow only what can be page-locked
        got = self.shm.read_inputs(header, lease.allocate if lease is not None else None,
                                   names=set(names) - (large - borrow), borrow=borrow,
                                   holds=holds if pinned else None)
        large -= set(got)  # what could not be borrowed is read later, as below
        if large:
            self.shm.read_inputs(header, names=large, check_only=True)
        return got, large

    def _write_outputs(self, job: Job, request: pb.Header, outputs: Dict[str, torch.Tensor]) -> None:
        job.output_descs = self.shm.write_outputs(request, outputs)

    def _attach_residuals(self, job: Job, handle: str) -> None:
        kept = self.residuals.take(handle)  # raises FAILED_PRECONDITION when evicted
        job.tensors = {**kept.tensors, **job.tensors}
        job.shapes = kept.shapes
        job.params = kept.merge_params(job.params)
        dout = job.tensors["dout"]
        if tuple(dout.shape) != tuple(job.tensors["q"].shape) or dout.dtype != job.tensors["q"].dtype:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"dout: must match the forward's q ({job.tensors['q'].dtype} "
                               f"{list(job.tensors['q'].shape)}), got {dout.dtype} {list(dout.shape)}")

    async def _send(self, reply: pb.Header, outputs: Dict[str, torch.Tensor], request: pb.Header,
                    timings: Dict[str, float], descs: Optional[list]):
        """Stream the reply. timings: the job's stage times; descs: the outputs' descriptors when the compute
        worker already wrote them into shared memory."""
        set_timings(reply, timings)
        names = list(outputs)
        if request.output_region and self.shm is not None:
            if descs is None:  # not written by the compute worker (Job.finish): write them now
                descs = await asyncio.get_running_loop().run_in_executor(self.copier, self.shm.write_outputs,
                                                                         request, outputs)
            reply.tensors.extend(descs)
            yield pb.Frame(header=reply)
            return
        reply.tensors.extend(describe(n, outputs[n]) for n in names)
        chunk = request.chunk_bytes or self.config.chunk_bytes
        chunk = min(chunk, self.config.max_message_bytes - 1024)
        tensors = [outputs[n] for n in names]
        chunk = chunk_size_for(sum(t.numel() * t.element_size() for t in tensors), chunk)
        if chunk_count(tensors, chunk) < 2:
            for frame in iter_encoded(reply, tensors, chunk):  # pre-encoded Frame bytes
                yield frame
        else:  # the next chunks are encoded on helper threads while this one is sent
            yield pb.Frame(header=reply).SerializeToString()
            loop = asyncio.get_running_loop()
            # the chunks' byte views are made off the loop too: torch calls release the GIL and wait to retake it
            parts = iter(await loop.run_in_executor(self.copier, lambda: list(chunk_pieces(tensors, chunk))))
            pending = collections.deque()

            def refill():
                while len(pending) < REPLY_ENCODE_AHEAD:
                    pieces = next(parts, None)
                    if pieces is None:
                        return
                    pending.append(loop.run_in_executor(self.copier, encode_chunk, pieces))
            refill()
            while pending:
                frame = await pending.popleft()
                refill()
                yield frame
        metrics.BYTES_OUT.inc(sum(d.nbytes for d in reply.tensors))
