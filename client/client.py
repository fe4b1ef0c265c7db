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

from . import wire
from .errors import RemoteError, ResidualsEvicted

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class Client:
    """A connection to one flashserve server.

    target: "host:port" or "unix:/path". timeout: seconds per call (None: no deadline).
    token: bearer token. tls / root_certificates: TLS with the system or given CA.
    retries: attempts for calls the server could not take (UNAVAILABLE); all calls are pure, so
    a retry is safe. chunk_bytes: size of the byte chunks on the wire. load_balancing: a gRPC
    policy such as "round_robin" to spread calls over every address a `dns:///` target resolves to
    (e.g. a Kubernetes headless service)."""

    def __init__(self, target: str, timeout: Optional[float] = None, token: Optional[str] = None,
                 tls: bool = False, root_certificates: Optional[bytes] = None, retries: int = 3,
                 chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES, max_message_bytes: int = 80 << 20,
                 transport: str = "auto", load_balancing: Optional[str] = None):
        self.target = target
        self.timeout = timeout
        self.retries = max(1, retries)
        self.chunk_bytes = min(chunk_bytes, max_message_bytes - 1024)
        self.transport = transport
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if load_balancing:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.AttentionStub(self._channel)
        self._info: Optional[pb.ServerInfo] = None
        self.last_timings: Optional[pb.Timings] = None
        self.bytes_sent = 0
        self.bytes_received = 0

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

    def _stream_call(self, method, header: pb.Header, tensors: Sequence[torch.Tensor],
                     timeout: Optional[float] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        header.chunk_bytes = self.chunk_bytes

        def attempt(timeout, metadata):
            sent = 0

            def frames():
                nonlocal sent
                for frame in wire.iter_frames(header, tensors, self.chunk_bytes):
                    sent += len(frame.chunk)
                    yield frame

            reply, outputs = wire.read_stream(method(frames(), timeout=timeout, metadata=metadata))
            self.bytes_sent += sent
            return reply, outputs

        reply, outputs = self._rpc(attempt, timeout=timeout)
        self.bytes_received += sum(t.numel() * t.element_size() for t in outputs.values())
        self.last_timings = reply.timings
        return reply, outputs

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
        return self._stream_call(self._stub.Forward, header, [t for _, t in named], timeout)

    def backward(self, dout, params: pb.AttentionParams, q=None, k=None, v=None, out=None, softmax_lse=None,
                 cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None, residual_handle: str = "",
                 timeout: Optional[float] = None) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
        """Packed varlen backward; with residual_handle only dout travels. Returns {"dq", "dk", "dv"}."""
        if residual_handle:
            named = [("dout", dout)]
        else:
            named = [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("softmax_lse", softmax_lse),
                     ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)]
            if alibi_slopes is not None:
                named.append(("alibi_slopes", alibi_slopes))
        header = pb.Header(operation=pb.BACKWARD, params=params, residual_handle=residual_handle,
                           tensors=[wire.describe(n, t) for n, t in named])
        return self._stream_call(self._stub.Backward, header, [t for _, t in named], timeout)

    def release(self, handles: Sequence[str]) -> int:
        return self._rpc(self._stub.Release, pb.ReleaseRequest(residual_handles=list(handles))).released

    def close(self) -> None:
        self._channel.close()

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
