"""`flashserve serve --frontends N`: N gRPC front-end processes feeding one GPU process (the engine).

Why: one Python process serves several hundred small requests per second, not more: its event loop (gRPC,
frame decoding, validation) and its compute threads share one GIL (measured on an H200 host:
bench/results/service_cuda_2026-12-03_h200_session6.md). Here the process that `serve` starts keeps the backend,
the batching scheduler, the shared-memory GPU copies and the residuals, and speaks no gRPC; N front-end processes
(its children, restarted when they die) share the TCP port (SO_REUSEPORT), speak gRPC (health, reflection,
auth, TLS), decode and validate each request and hand it to the engine over a Unix socket. Batching then spans
the clients of every front end, and the engine's GIL is spent on the hand-over, shared-memory views and launches
(a profile of it under load: bench/results/engine_profile_2026-12-03_h200_session7.txt; its per-request cost on any
machine: bench/engine_requests.py).

What a front end hands over: the request header; the tensors it validated, by value (cu_seqlens, alibi: the
client cannot change them after the check); chunk-path tensors by value (extra host copies: the gRPC chunk
path with large payloads is better served by one process); and the names of large shared-memory tensors, which
the engine reads itself (from page-locked client memory straight into the GPU copy). Outputs go back the same
way: into the client's output region by the engine, or by value for the front end to stream.

Messages are length-prefixed pickles on a socket in a private (0700) directory: both ends are our processes.
  front end -> engine: (id, kind, payload), kind "info" | "run" | "cancel" | "release"
  engine -> front end: (id, ok, payload); when not ok, payload = (gRPC status code name, message)"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import struct
from typing import Callable, Dict, Optional

import grpc
import torch

from flashserve.proto import attention_pb2 as pb
from flashserve.wire import PROTO_TO_TORCH, TORCH_TO_PROTO, WireError, byte_view, host_bytes

from .backends.base import AttentionParams, Capabilities
from .service import AttentionService, CallResources
from .validation import RequestError, Shapes, attention_params

log = logging.getLogger(__name__)

ENGINE_ENV = "FLASHSERVE_ENGINE_SOCKET"  # set in a front end's environment: the engine's socket path
_LEN = struct.Struct("<Q")


def tensor_to_wire(t: torch.Tensor) -> tuple:
    raw = host_bytes(t)  # (no torch op where it can)
    return TORCH_TO_PROTO[t.dtype], tuple(t.shape), bytearray(raw if raw is not None else byte_view(t))


def _values(obj) -> tuple:
    """A dataclass instance's field values in order (dataclasses.astuple deep-copies each one)."""
    return tuple(vars(obj).values())


def tensor_from_wire(value: tuple) -> torch.Tensor:
    code, shape, raw = value
    dtype = PROTO_TO_TORCH[code]
    if not raw:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(raw, dtype=dtype)  # one torch call (small tensors: cu_seqlens, alibi slopes)
    return t if len(shape) == 1 else t.view(shape)


class _Messages(asyncio.Protocol):
    """Length-prefixed pickles over a stream socket, parsed as bytes arrive (no coroutine per message: the
    engine's event loop is the busiest thread of the server). on_message(message) runs for each complete
    message, on_lost() once when the connection ends. Messages sent during one turn of the event loop leave
    together, as one pickled list, at its end (e.g. the answers to all members of a batch): one pickle and one
    write instead of one per message."""

    def __init__(self, on_message: Callable[[object], None], on_lost: Callable[[], None]):
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: Optional[asyncio.Transport] = None
        self._buf = bytearray()
        self._outbox: list = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= _LEN.size:
            n = _LEN.unpack_from(buf, pos)[0]
            end = pos + _LEN.size + n
            if len(buf) < end:
                break
            with memoryview(buf) as view:
                message = pickle.loads(view[pos + _LEN.size:end])
            pos = end
            for m in (message if isinstance(message, list) else (message,)):  # a list: one turn's messages
                self.on_message(m)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        self.on_lost()

    def send(self, message: tuple) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the other end is gone: nobody reads this
        self._outbox.append(message)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if not out or self.transport is None or self.transport.is_closing():
            return
        data = pickle.dumps(out if len(out) > 1 else out[0], protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_LEN.pack(len(data)) + data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _failure(exc: BaseException) -> tuple:
    if isinstance(exc, RequestError):
        return exc.code.name, exc.message
    if isinstance(exc, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT.name, str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED.name, "the GPU ran out of memory for this request"
    log.error("engine request failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL.name, f"internal error: {type(exc).__name__}: {exc}"


# ---- the GPU process --------------------------------------------------------------------------------
class Engine:
    """Serves the front ends' requests with a service's backend, scheduler, shared memory and residuals."""

    def __init__(self, service: AttentionService):
        self.service = service
        self.server: Optional[asyncio.AbstractServer] = None
        self.connections = 0
        # Per front end, the requests it had in flight when it last sent one: the scheduler launches a batch at
        # once only when all of them have reached it (else batch-mates are on their way: wait up to the delay).
        self._upstream: Dict[object, int] = {}
        service.scheduler.upstream = lambda: sum(self._upstream.values())

    def reported(self, conn: object, in_flight: int) -> None:
        """A front end's request says how many it has in flight (itself included)."""
        self._upstream[conn] = in_flight

    def answered(self, conn: object) -> None:
        """One request fewer in flight at that front end (until its next request says otherwise)."""
        if conn in self._upstream:
            self._upstream[conn] = max(0, self._upstream[conn] - 1)

    def info(self) -> dict:
        svc = self.service
        return dict(backend=svc.backend.name, device=svc.backend.device_name(), caps=svc.caps,
                    residuals=svc.residuals is not None, shm=svc.shm is not None)

    async def start(self, path: str) -> None:
        self.server = await asyncio.get_running_loop().create_unix_server(self._connection, path=path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _connection(self) -> _Messages:
        """A front end connected: its messages are answered on this loop, each request by a task of its own."""
        tasks: Dict[int, asyncio.Task] = {}
        conn = object()

        def on_message(message) -> None:
            rid, kind, payload = message
            if kind == "cancel":  # the caller went away: a job not yet launched is skipped
                task = tasks.get(rid)
                if task is not None:
                    task.cancel()
                return
            if kind == "run":
                self.reported(conn, payload["in_flight"])
            task = asyncio.ensure_future(self._answer(proto, conn, rid, kind, payload))
            tasks[rid] = task
            task.add_done_callback(lambda _t: tasks.pop(rid, None))

        def on_lost() -> None:
            self.connections -= 1
            self._upstream.pop(conn, None)
            for task in list(tasks.values()):  # its front end is gone: nobody reads these answers
                task.cancel()

        proto = _Messages(on_message, on_lost)
        self.connections += 1
        return proto

    async def _answer(self, proto: _Messages, conn, rid: int, kind: str, payload) -> None:
        try:
            if kind == "run":
                result = await self._run(payload)
            elif kind == "release":
                result = self.service.residuals.release(payload) if self.service.residuals is not None else 0
            elif kind == "info":
                result = self.info()
            else:
                raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"engine: unknown message kind {kind!r}")
            answer = (rid, True, result)
        except asyncio.CancelledError:
            answer = None  # its caller went away
        except Exception as exc:  # each request fails alone
            answer = (rid, False, _failure(exc))
        if kind == "run":
            self.answered(conn)
        if answer is not None:
            proto.send(answer)

    async def _run(self, p: dict) -> dict:
        svc = self.service
        if svc.in_flight >= svc.config.max_concurrent:  # each front end checks its own calls; this, all of them
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server is serving {svc.in_flight} requests (all front ends), its limit "
                               f"(--max-concurrent); retry later")
        op = p["op"]
        header = pb.Header.FromString(p["header"])
        res = CallResources(svc.pool.lease() if svc.pool is not None else None)
        svc.in_flight += 1  # the scheduler launches at once when every request in flight is queued
        tensors = outputs = job = None
        try:
            svc.admit(p["nbytes"], res.admitted)  # --max-inflight-bytes holds for all front ends together
            tensors = {name: tensor_from_wire(v) for name, v in p["tensors"].items()}
            params = AttentionParams(*p["params"]) if p["params"] is not None else None
            if params is None:  # backward on kept residuals: their head dim is known here only
                if svc.residuals is None:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "residual_handle: this server keeps no residuals; send the tensors")
                params = attention_params(header, svc.residuals.head_dim(header.residual_handle), svc.caps, op)
            large = set(p["large"])
            if large:
                got, large = svc.shm_inputs(header, large, res.lease, res.holds)
                tensors.update(got)
            shapes = p["shapes"]
            if shapes is not None:
                shapes = Shapes(*shapes[:-1], PROTO_TO_TORCH[shapes[-1]])
            reply, outputs, job = await svc.run_job(op, header, tensors, shapes, params, p["received_s"],
                                                    large, p["remaining"], res)
            # (the front end puts the timings into the reply: less work on this, the busiest, loop)
            result = dict(handle=reply.residual_handle, timings=job.timings)
            if header.output_region and svc.shm is not None:
                descs = job.output_descs
                if descs is None:  # not written by the compute worker (kept residuals): write them now
                    descs = await asyncio.get_running_loop().run_in_executor(svc.copier, svc.shm.write_outputs,
                                                                             header, outputs)
                result["descs"] = [d.SerializeToString() for d in descs]
            else:
                result["outputs"] = {name: tensor_to_wire(t) for name, t in outputs.items()}
            return result
        finally:
            tensors = outputs = job = None
            svc.in_flight -= 1
            svc.release_resources(res)


# ---- the front end's side ------------------------------------------------------------------------
def run_payload(operation: int, header: pb.Header, tensors, shapes, params, large, received_s: float,
                remaining: Optional[float], in_flight: int) -> dict:
    """A validated request as the engine's "run" message. Shapes and parameters travel as plain tuples (cheaper
    to unpickle); nbytes is counted here (the engine's admission check then reads no descriptors)."""
    return dict(op=operation, header=header.SerializeToString(),
                shapes=None if shapes is None else (*_values(shapes)[:-1], TORCH_TO_PROTO[shapes.dtype]),
                params=None if params is None else _values(params),
                tensors={name: tensor_to_wire(t) for name, t in tensors.items()}, large=sorted(large),
                remaining=remaining, received_s=received_s, in_flight=in_flight,
                nbytes=sum(d.nbytes for d in header.tensors))


class RemoteBackend:
    """What a front end knows of the engine's backend (for validation and GetServerInfo); computes nothing."""

    def __init__(self, info: dict):
        self.name = info["backend"]
        self._device_name = info["device"]
        self._caps: Capabilities = info["caps"]
        self.device = torch.device("cpu")  # this process's buffers live in host memory

    def capabilities(self) -> Capabilities:
        return self._caps

    def device_name(self) -> str:
        return self._device_name


class EngineClient:
    """A front end's connection to the engine. Stands in for the scheduler in the service (`close`)."""

    allocate = None  # receive buffers: the service's pooled host buffers
    upstream = None

    def __init__(self, path: str, on_lost: Optional[Callable[[], None]] = None):
        self.path = path
        self.on_lost = on_lost
        self.info: dict = {}
        self._ids = itertools.count(1)
        self._pending: Dict[int, asyncio.Future] = {}
        self._proto: Optional[_Messages] = None
        self._lost = False

    async def connect(self) -> dict:
        loop = asyncio.get_running_loop()
        _, self._proto = await loop.create_unix_connection(lambda: _Messages(self._on_message, self._on_lost),
                                                           self.path)
        self.info = await self._request("info", None)
        return self.info

    def _on_message(self, message) -> None:
        rid, ok, payload = message
        fut = self._pending.get(rid)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(RequestError(grpc.StatusCode[payload[0]], payload[1]))

    def _on_lost(self) -> None:
        self._lost = True
        lost = RequestError(grpc.StatusCode.UNAVAILABLE, "the server's GPU process is gone; retry")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(lost)
        if self.on_lost is not None:
            self.on_lost()

    async def _request(self, kind: str, payload):
        if self._lost or self._proto is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server's GPU process is gone; retry")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._proto.send((rid, kind, payload))
            return await fut
        except asyncio.CancelledError:
            if kind == "run":
                self._proto.send((rid, "cancel", None))
            raise
        finally:
            self._pending.pop(rid, None)

    async def run(self, operation: int, header: pb.Header, tensors, shapes, params, large, received_s: float,
                  remaining: Optional[float], in_flight: int = 1):
        """Compute one validated request in the engine: (reply header, outputs by value, output descriptors,
        stage timings). in_flight: this front end's requests in flight now, this one included (for the engine's
        batching policy)."""
        payload = run_payload(operation, header, tensors, shapes, params, large, received_s, remaining, in_flight)
        result = await self._request("run", payload)
        reply = pb.Header(operation=operation, residual_handle=result["handle"])
        if "descs" in result:
            return reply, {}, [pb.TensorDesc.FromString(d) for d in result["descs"]], result["timings"]
        return reply, {name: tensor_from_wire(v) for name, v in result["outputs"].items()}, None, result["timings"]

    async def release(self, handles) -> int:
        return await self._request("release", list(handles))

    async def close(self) -> None:
        if self._proto is not None:
            self._proto.close()


def frontend_socket_path() -> Optional[str]:
    return os.environ.get(ENGINE_ENV) or None
