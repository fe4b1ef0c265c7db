"""`Client`: one server connection (channel, TLS, bearer token, retries, deadlines) and the
Forward / Backward / GetServerInfo / Release calls in the packed varlen layout.

The process-wide default client comes from `flashserve.connect(target, ...)` or, on first use,
from the FLASHSERVE_TARGET environment variable."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

import grpc
import torch

from flashserve.proto import attention_pb2 as pb
from flashserve.proto import attention_pb2_grpc as pb_grpc

from . import heap
from . import shm as shm_transport
from . import wire
from .buffers import RecyclingPool
from .errors import RemoteError, ResidualsEvicted

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
HEAP_KEEP_FROM_BYTES = 16 << 20  # a call sending this much over gRPC chunks makes the process keep freed memory


class Client:
    """A connection to one flashserve server.

    target: "host:port" or "unix:/path". timeout: seconds per call (None: no deadline).
    token: bearer token. tls / root_certificates: TLS with the system or given CA.
    retries: attempts for calls the server could not take (UNAVAILABLE); all calls are pure, so
    a retry is safe. chunk_bytes: size of the byte chunks on the wire. load_balancing: a gRPC
    policy such as "round_robin" to spread calls over every address a `dns:///` target resolves to
    (e.g. a Kubernetes headless service). transport: "auto" (shared memory when the server allows it
    and runs on this host behind a loopback or unix: target, else gRPC byte chunks), "shm" (always
    shared memory), "bytes" (always chunks) or "bytes-only" (chunks, and no server-side residuals).
    heap_keep_bytes: from the first call that sends at least 16 MB over gRPC chunks on, this whole process keeps up
    to that much freed heap memory for reuse (glibc; flashserve.heap), so the chunks of large tensors reuse pages
    instead of faulting fresh ones in on every call (a 64 MB round trip: ~15 ms less on our CPU machine). It changes
    the allocator of the caller's process (up to that much freed memory per heap stays with it): 0 leaves it alone."""

    def __init__(self, target: str, timeout: Optional[float] = None, token: Optional[str] = None,
                 tls: bool = False, root_certificates: Optional[bytes] = None, retries: int = 3,
                 chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES, max_message_bytes: int = 80 << 20,
                 transport: str = "auto", load_balancing: Optional[str] = None, heap_keep_bytes: int = 256 << 20):
        self.heap_keep_bytes = heap_keep_bytes
        self.target = target
        self.timeout = timeout
        self.retries = max(1, retries)
        self.chunk_bytes = min(chunk_bytes, max_message_bytes - 1024)
        self.transport = transport
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   # A dropped connection (a server process restarting, one of `serve --processes N` dying) is
                   # retried within a few hundred ms: gRPC's default first reconnect waits 1 s, longer than all
                   # of this client's retries together, so they would fail fast against a channel still backing off.
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   # its own connection: gRPC would otherwise share one TCP connection among every channel of the
                   # process with the same target and settings, and so send all of them to one server process
                   ("grpc.use_local_subchannel_pool", 1)]
        if load_balancing:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.AttentionStub(self._channel)
        service = pb.DESCRIPTOR.services_by_name["Attention"].full_name
        # Forward / Backward with the fast frame codec (chunks without protobuf copies; same bytes on the wire)
        self._streams = {name: self._channel.stream_stream(f"/{service}/{name}", request_serializer=wire.encode_frame,
                                                           response_deserializer=wire.decode_frame)
                         for name in ("Forward", "Backward")}
        # one-message calls for requests wholly in shared memory (no stream to set up: no helper threads)
        self._unary_call = self._channel.unary_unary(f"/{service}/Call", request_serializer=pb.Header.SerializeToString,
                                                     response_deserializer=pb.Header.FromString)
        self._unary_ok = True  # until a server answers UNIMPLEMENTED (older servers): then streams
        self._info: Optional[pb.ServerInfo] = None
        self.last_timings: Optional[pb.Timings] = None
        self.bytes_sent = 0  # tensor bytes sent / received in gRPC chunks
        self.bytes_received = 0
        self.shm_bytes_sent = 0  # tensor bytes passed through shared memory
        self.shm_bytes_received = 0
        self._shm_ok: Optional[bool] = None  # decided on first use (transport="auto")
        self._regions: Optional[shm_transport.RegionPool] = None
        self._kv_bytes: Dict[str, Tuple[int, int]] = {}  # residual handle -> (k, v) bytes, for dk/dv slots
        self._kv_lock = threading.Lock()
        self._buffers = RecyclingPool()  # result buffers, reused once the caller dropped them (no page faults)

    # ---- plumbing ----------------------------------------------------------------------------
    def _rpc(self, fn, *args, timeout: Optional[float] = None):
        timeout = self.timeout if timeout is None else timeout
        delay = 0.05
        for attempt in range(self.retries):
            try:
                return fn(*args, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() in RETRYABLE and attempt + 1 < self.retries:
                    time.sleep(delay)
                    delay *= 4
                    continue
                raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> RemoteError:
        code, details = exc.code(), exc.details() or ""
        cls = ResidualsEvicted if code == grpc.StatusCode.FAILED_PRECONDITION and "residual" in details else RemoteError
        return cls(code, details, self.target)

    def uses_shm(self) -> bool:
        """Whether calls put their tensors in shared memory (decided once, on first use)."""
        if self._shm_ok is None:
            if self.transport == "shm":
                self._shm_ok = shm_transport.available()
            elif self.transport == "auto" and shm_transport.available() and \
                    shm_transport.is_local_target(self.target):
                try:
                    info = self.server_info()
                    self._shm_ok = bool(info.shared_memory) and shm_transport.same_host(info.hostname)
                except RemoteError:
                    self._shm_ok = False
            else:
                self._shm_ok = False
        return self._shm_ok

    def _stream_call(self, method, header: pb.Header, tensors: Sequence[torch.Tensor],
                     timeout: Optional[float] = None,
                     out_sizes: Optional[Sequence[int]] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        """One Forward/Backward call. out_sizes: byte sizes of the outputs, in order, when known (lets the
        server write them into shared memory)."""
        if self.uses_shm():
            try:
                return self._shm_call(method, header, tensors, timeout, out_sizes)
            except RemoteError as exc:
                if not (exc.code == grpc.StatusCode.INVALID_ARGUMENT and "shared-memory" in exc.details
                        and ("unknown" in exc.details or "does not accept" in exc.details)):
                    raise
                if "unknown" in exc.details and self._regions.memfd:
                    # the server cannot open our memfds (e.g. another PID namespace): try /dev/shm files
                    self._regions.use_files()
                    return self._stream_call(method, header, tensors, timeout, out_sizes)
                self._shm_ok = False  # the server cannot see our regions after all: chunks from now on
                for d in header.tensors:
                    d.ClearField("shm")
                header.output_region, header.output_offset = "", 0
        return self._bytes_call(method, header, tensors, timeout)

    def _shm_call(self, method, header: pb.Header, tensors: Sequence[torch.Tensor], timeout, out_sizes):
        if self._regions is None:
            with self._kv_lock:
                if self._regions is None:
                    self._regions = shm_transport.RegionPool()
        in_bytes = sum(shm_transport.align(t.numel() * t.element_size()) for t in tensors)
        region = self._regions.acquire(in_bytes)
        out_region = None
        if out_sizes:  # results come back as views of a region of their own: no copy out
            out_region = self._regions.acquire_output(sum(shm_transport.align(n) for n in out_sizes))
        try:
            if any(t.is_cuda for t in tensors):  # the copies into the region and out of it involve the GPU
                region.pin()
                if out_region is not None:
                    out_region.pin()
            pos = 0
            for desc, t in zip(header.tensors, tensors):
                desc.shm.region, desc.shm.offset = region.name, pos
                pos += shm_transport.align(region.put(t, pos))
            if out_region is not None:
                header.output_region, header.output_offset = out_region.name, 0
            reply, outputs = self._header_call(method, header, timeout) if out_region is not None else \
                self._bytes_call(method, header, [], timeout)
            for d in reply.tensors:
                if d.HasField("shm"):
                    if out_region is None or d.shm.region != out_region.name:
                        raise RemoteError(grpc.StatusCode.INTERNAL, f"the server wrote '{d.name}' into region "
                                          f"{d.shm.region!r}, not the one we named", self.target)
                    outputs[d.name] = out_region.view(d.shm.offset, wire.PROTO_TO_TORCH[d.dtype], d.shape)
                    self.shm_bytes_received += d.nbytes
            self.shm_bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
            self.bytes_received -= sum(d.nbytes for d in reply.tensors if d.HasField("shm"))
            return reply, outputs
        finally:
            self._regions.release(region)
            if out_region is not None:
                self._regions.release_output(out_region)

    def _header_call(self, method, header: pb.Header, timeout) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        """A request whose tensors all lie in shared memory: one `Call` message each way where the server has it."""
        if self._unary_ok:
            try:
                reply = self._rpc(self._unary_call, header, timeout=timeout)
            except RemoteError as exc:
                if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._unary_ok = False
            else:
                self.bytes_received += sum(d.nbytes for d in reply.tensors)
                self.last_timings = reply.timings
                return reply, {}
        return self._bytes_call(method, header, [], timeout)

    def _bytes_call(self, method, header: pb.Header, tensors: Sequence[torch.Tensor],
                    timeout: Optional[float] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        header.chunk_bytes = self.chunk_bytes

        sent = sum(d.nbytes for d in header.tensors if not d.HasField("shm"))
        self._keep_heap_for(sent)

        chunk = wire.chunk_size_for(sent, self.chunk_bytes)

        def attempt(timeout, metadata):
            frames = wire.iter_encoded(header, tensors, chunk)
            if wire.chunk_count(tensors, chunk) > 1:
                frames = wire.ahead(frames)  # encode the next chunk while this one is sent
            reply, outputs = wire.read_stream(method(frames, timeout=timeout, metadata=metadata),
                                              allocate=self._buffers.allocate, read_ahead_bytes=wire.READ_AHEAD_BYTES)
            self.bytes_sent += sent
            return reply, outputs

        reply, outputs = self._rpc(attempt, timeout=timeout)
        self.bytes_received += sum(d.nbytes for d in reply.tensors)
        self.last_timings = reply.timings
        return reply, outputs

    def _keep_heap_for(self, nbytes: int) -> None:
        """Keep freed memory for reuse once this process moves large payloads over gRPC chunks (see heap_keep_bytes)."""
        if nbytes >= HEAP_KEEP_FROM_BYTES and self.heap_keep_bytes > 0:
            heap.keep_freed_memory(self.heap_keep_bytes)

    # ---- calls -------------------------------------------------------------------------------
    def server_info(self, refresh: bool = False) -> pb.ServerInfo:
        if self._info is None or refresh:
            self._info = self._rpc(self._stub.GetServerInfo, pb.GetServerInfoRequest())
        return self._info

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: pb.AttentionParams,
                alibi_slopes: Optional[torch.Tensor] = None, keep_residuals: bool = False,
                timeout: Optional[float] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        """Packed varlen forward; returns (reply header, {"out", "softmax_lse"[, "s_dmask"]}) on the CPU."""
        named = [("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
        if alibi_slopes is not None:
            named.append(("alibi_slopes", alibi_slopes))
        header = pb.Header(operation=pb.FORWARD, params=params, keep_residuals=keep_residuals,
                           tensors=[wire.describe(n, t) for n, t in named])
        out_sizes = None
        if not params.return_softmax:  # S_dmask's size is the server's business: outputs come in chunks then
            out_sizes = [q.numel() * q.element_size(), q.shape[0] * q.shape[1] * 4]
        reply, outs = self._stream_call(self._streams["Forward"], header, [t for _, t in named], timeout, out_sizes)
        if reply.residual_handle:
            with self._kv_lock:
                self._kv_bytes[reply.residual_handle] = (k.numel() * k.element_size(), v.numel() * v.element_size())
        return reply, outs

    def backward(self, dout, params: pb.AttentionParams, q=None, k=None, v=None, out=None, softmax_lse=None,
                 cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None, residual_handle: str = "",
                 timeout: Optional[float] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        """Packed varlen backward; with residual_handle only dout travels. Returns {"dq", "dk", "dv"}."""
        dq_bytes = dout.numel() * dout.element_size()
        if residual_handle:
            named = [("dout", dout)]
            with self._kv_lock:
                kv = self._kv_bytes.get(residual_handle)
            out_sizes = None if kv is None else [dq_bytes, *kv]
        else:
            out_sizes = [dq_bytes, k.numel() * k.element_size(), v.numel() * v.element_size()]
            named = [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("softmax_lse", softmax_lse),
                     ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
            if alibi_slopes is not None:
                named.append(("alibi_slopes", alibi_slopes))
        header = pb.Header(operation=pb.BACKWARD, params=params, residual_handle=residual_handle,
                           tensors=[wire.describe(n, t) for n, t in named])
        return self._stream_call(self._streams["Backward"], header, [t for _, t in named], timeout, out_sizes)

    def release(self, handles: Sequence[str]) -> int:
        with self._kv_lock:
            for h in handles:
                self._kv_bytes.pop(h, None)
        return self._rpc(self._stub.Release, pb.ReleaseRequest(residual_handles=list(handles))).released

    def close(self) -> None:
        self._channel.close()
        if self._regions is not None:
            self._regions.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: Optional[Client] = None
_default_lock = threading.Lock()


def connect(target: Optional[str] = None, **kwargs) -> Client:
    """Make the process-wide default client (used by the flash_attn-style functions) and return it."""
    global _default
    target = target or os.environ.get("FLASHSERVE_TARGET")
    if not target:
        raise RuntimeError("no flashserve server: call flashserve.connect('host:port') or set FLASHSERVE_TARGET")
    if "token" not in kwargs and os.environ.get("FLASHSERVE_TOKEN"):
        kwargs["token"] = os.environ["FLASHSERVE_TOKEN"]
    client = Client(target, **kwargs)
    with _default_lock:
        old, _default = _default, client
    if old is not None:
        old.close()
    return client


def default_client() -> Client:
    with _default_lock:
        client = _default
    return client if client is not None else connect()
