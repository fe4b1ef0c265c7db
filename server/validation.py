"""Request validation: every rule a request must meet, each failure a gRPC status and a message that
names the field and says what was wrong.

Two stages: `check_header` sees only the descriptors (shapes, dtypes, parameters, limits) and runs
before any byte is received or any memory is taken; `check_contents` runs on the received tensors
(cu_seqlens values, max_seqlen)."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import grpc
import torch

from flashserve.proto import attention_pb2 as pb
from flashserve.wire import PROTO_TO_TORCH, dtype_name, expected_nbytes

from .backends.base import AttentionParams, Capabilities, head_dim_class
from .config import ServerConfig

FORWARD_REQUIRED = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
BACKWARD_REQUIRED = ("dout", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q", "cu_seqlens_k")
OPTIONAL = ("alibi_slopes",)


class RequestError(Exception):
    """A request that cannot be served, with the gRPC status it earns."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass
class Shapes:
    """What the header says about one attention call."""

    total_q: int
    total_k: int
    heads_q: int
    heads_k: int
    head_dim: int
    batch: int
    dtype: torch.dtype


def _desc_map(header: pb.Header) -> Dict[str, pb.TensorDesc]:
    out = {}
    for d in header.tensors:
        if d.name in out:
            raise invalid(f"tensor '{d.name}' is described twice")
        out[d.name] = d
    return out


def _dtype(d: pb.TensorDesc) -> torch.dtype:
    if d.dtype not in PROTO_TO_TORCH:
        raise invalid(f"{d.name}: unknown dtype code {d.dtype}")
    return PROTO_TO_TORCH[d.dtype]


def _shape(d: pb.TensorDesc, rank: int) -> tuple:
    shape = tuple(d.shape)
    if len(shape) != rank:
        raise invalid(f"{d.name}: expected {rank} dimensions, got shape {list(shape)}")
    if any(s < 0 for s in shape):
        raise invalid(f"{d.name}: negative dimension in shape {list(shape)}")
    return shape


def check_header(header: pb.Header, operation: int, caps: Capabilities, config: ServerConfig,
                 has_residuals: bool = False) -> Shapes:
    """Descriptor-level checks. `has_residuals`: a Backward whose q, k, v, out, lse come from a handle."""
    if header.operation != operation:
        name = pb.Operation.Name(header.operation) if header.operation in pb.Operation.values() else None
        if name is None:
            raise invalid(f"operation: unknown operation {header.operation}")
        raise invalid(f"operation: {name} sent to the {pb.Operation.Name(operation).title()} method")
    descs = _desc_map(header)
    for d in descs.values():
        try:
            nbytes = expected_nbytes(d)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if d.nbytes != nbytes:
            raise invalid(f"{d.name}: header says {d.nbytes} bytes but shape {list(d.shape)} of "
                          f"{dtype_name(d.dtype)} holds {nbytes}")
    required = FORWARD_REQUIRED if operation == pb.FORWARD else BACKWARD_REQUIRED
    if has_residuals:
        required = ("dout",)
    allowed = set(required) | set(OPTIONAL)
    for name in required:
        if name not in descs:
            raise invalid(f"missing tensor '{name}'")
    for name in descs:
        if name not in allowed:
            raise invalid(f"unexpected tensor '{name}' (a {pb.Operation.Name(operation).title()} takes "
                          f"{', '.join(required + OPTIONAL)})")
    total_bytes = sum(d.nbytes for d in descs.values())
    if total_bytes > config.max_request_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request holds {total_bytes} bytes of tensors; this server's limit is "
                           f"{config.max_request_bytes} (--max-request-bytes)")
    if has_residuals:
        return None  # the residuals' shapes were checked when they were kept
    return _check_attention_shapes(descs, operation, caps, config)


def _check_attention_shapes(descs, operation, caps: Capabilities, config: ServerConfig) -> Shapes:
    q, k, v = descs["q"], descs["k"], descs["v"]
    dtype = _dtype(q)
    if dtype not in caps.dtypes:
        allowed = ", ".join(str(t).replace("torch.", "") for t in caps.dtypes)
        raise invalid(f"q: dtype {dtype_name(q.dtype)} is not supported by this backend (supported: {allowed})")
    for d in (k, v):
        if _dtype(d) != dtype:
            raise invalid(f"{d.name}: dtype {dtype_name(d.dtype)} differs from q's {dtype_name(q.dtype)}")
    total_q, heads_q, head_dim = _shape(q, 3)
    total_k, heads_k, head_dim_k = _shape(k, 3)
    if tuple(v.shape) != tuple(k.shape):
        raise invalid(f"v: shape {list(v.shape)} differs from k's {list(k.shape)}")
    if head_dim_k != head_dim:
        raise invalid(f"k: head dim {head_dim_k} differs from q's {head_dim}")
    if head_dim < 1 or head_dim > caps.max_head_dim:
        raise invalid(f"q: head dim {head_dim} is outside 1..{caps.max_head_dim}")
    if caps.head_dim_classes and head_dim_class(head_dim) not in caps.head_dim_classes:
        built = ", ".join(str(c) for c in caps.head_dim_classes)
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           f"q: head dim {head_dim} runs in the head-dim-{head_dim_class(head_dim)} kernels, which this "
                           f"server's build does not contain (built: {built}; FLASHSERVE_HEADDIMS)")
    if heads_q < 1 or heads_k < 1:
        raise invalid(f"q/k: the number of heads must be positive (q has {heads_q}, k has {heads_k})")
    if heads_q % heads_k:
        raise invalid(f"k: {heads_k} key/value heads do not divide {heads_q} query heads")
    if heads_k != heads_q and "gqa" not in caps.features:
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED, "k: this backend does not support grouped-query attention")
    tokens = total_q + total_k
    if tokens > config.max_tokens:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request holds {tokens} q+k tokens; this server's limit is {config.max_tokens} "
                           "(--max-tokens)")
    cq, ck = descs["cu_seqlens_q"], descs["cu_seqlens_k"]
    for d in (cq, ck):
        if _dtype(d) != torch.int32:
            raise invalid(f"{d.name}: must be int32, got {dtype_name(d.dtype)}")
        (n,) = _shape(d, 1)
        if n < 2:
            raise invalid(f"{d.name}: needs batch + 1 >= 2 entries, got {n}")
    if cq.shape[0] != ck.shape[0]:
        raise invalid(f"cu_seqlens_k: has {ck.shape[0]} entries but cu_seqlens_q has {cq.shape[0]} "
                      "(both must be batch + 1)")
    batch = cq.shape[0] - 1
    if "alibi_slopes" in descs:
        a = descs["alibi_slopes"]
        if "alibi" not in caps.features:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, "alibi_slopes: this backend does not support ALiBi")
        if _dtype(a) != torch.float32:
            raise invalid(f"alibi_slopes: must be float32, got {dtype_name(a.dtype)}")
        if tuple(a.shape) not in ((heads_q,), (batch, heads_q)):
            raise invalid(f"alibi_slopes: shape {list(a.shape)} must be ({heads_q},) or ({batch}, {heads_q})")
    if operation == pb.BACKWARD:
        for name in ("dout", "out"):
            d = descs[name]
            if _dtype(d) != dtype or tuple(d.shape) != tuple(q.shape):
                raise invalid(f"{name}: must match q ({dtype_name(q.dtype)} {list(q.shape)}), got "
                              f"{dtype_name(d.dtype)} {list(d.shape)}")
        lse = descs["softmax_lse"]
        if _dtype(lse) != torch.float32 or tuple(lse.shape) != (heads_q, total_q):
            raise invalid(f"softmax_lse: must be float32 ({heads_q}, {total_q}), got {dtype_name(lse.dtype)} "
                          f"{list(lse.shape)}")
    return Shapes(total_q, total_k, heads_q, heads_k, head_dim, batch, dtype)


def attention_params(header: pb.Header, head_dim: int, caps: Capabilities, operation: int) -> AttentionParams:
    """Parameters with defaults filled in, checked against their ranges and the backend's features."""
    p = header.params
    scale = p.softmax_scale if p.HasField("softmax_scale") else 1.0 / math.sqrt(head_dim)
    if not math.isfinite(scale) or scale <= 0:
        raise invalid(f"softmax_scale: must be a positive finite number, got {scale}")
    if not (0.0 <= p.dropout_p < 1.0):
        raise invalid(f"dropout_p: must be in [0, 1), got {p.dropout_p}")
    if not math.isfinite(p.softcap) or p.softcap < 0:
        raise invalid(f"softcap: must be >= 0 (0 turns it off), got {p.softcap}")
    window_left = p.window_left if p.HasField("window_left") else -1
    window_right = p.window_right if p.HasField("window_right") else -1
    if window_left < -1 or window_right < -1:
        raise invalid(f"window_size: entries must be >= -1, got ({window_left}, {window_right})")
    if p.max_seqlen_q < 0 or p.max_seqlen_k < 0:
        raise invalid(f"max_seqlen: must be >= 0, got q {p.max_seqlen_q}, k {p.max_seqlen_k}")
    feats = caps.features
    needs = []
    if window_left >= 0 or (window_right >= 0 and not p.causal):
        needs.append(("window", "window_size (sliding window)"))
    if p.causal:
        needs.append(("causal", "causal"))
    if p.softcap > 0:
        needs.append(("softcap", "softcap"))
    if p.dropout_p > 0:
        needs.append(("dropout", "dropout_p > 0"))
    if p.return_softmax:
        needs.append(("return_softmax", "return_attn_probs"))
    if p.deterministic and operation == pb.BACKWARD:
        needs.append(("deterministic", "deterministic backward"))
    for feature, what in needs:
        if feature not in feats:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"{what}: not supported by this server's backend")
    return AttentionParams(softmax_scale=float(scale), causal=p.causal, window_left=window_left,
                           window_right=window_right, softcap=float(p.softcap), dropout_p=float(p.dropout_p),
                           seed=p.seed, offset=p.offset, deterministic=p.deterministic,
                           max_seqlen_q=p.max_seqlen_q, max_seqlen_k=p.max_seqlen_k)


def check_cu_seqlens(values: List[int], name: str, total: int, max_seqlen: int, max_name: str) -> None:
    if values[0] != 0:
        raise invalid(f"{name}: must start at 0, starts at {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise invalid(f"{name}: must be non-decreasing, but entry {i + 1} ({values[i + 1]}) < entry {i} "
                          f"({values[i]})")
    if values[-1] != total:
        raise invalid(f"{name}: last entry {values[-1]} must equal the number of tokens ({total})")
    longest = max(lengths)
    if longest > max_seqlen:
        raise invalid(f"{max_name}: {max_seqlen} is below the longest sequence ({longest} tokens)")


def check_contents(tensors: Dict[str, torch.Tensor], shapes: Shapes, params: AttentionParams) -> AttentionParams:
    """Value checks on the received tensors; returns params with max_seqlen filled in if unset (0).

    Works on Python lists (tolist() of a CPU tensor keeps the GIL): every torch op that releases the GIL
    can leave the event loop waiting for a compute worker's next switch."""
    cq, ck = tensors["cu_seqlens_q"].tolist(), tensors["cu_seqlens_k"].tolist()
    mq = params.max_seqlen_q or _longest(cq)
    mk = params.max_seqlen_k or _longest(ck)
    check_cu_seqlens(cq, "cu_seqlens_q", shapes.total_q, mq, "max_seqlen_q")
    check_cu_seqlens(ck, "cu_seqlens_k", shapes.total_k, mk, "max_seqlen_k")
    a: Optional[torch.Tensor] = tensors.get("alibi_slopes")
    if a is not None and not torch.isfinite(a).all():
        raise invalid("alibi_slopes: must be finite")
    return dataclasses.replace(params, max_seqlen_q=mq, max_seqlen_k=mk)


def _longest(values) -> int:
    return max((b - a for a, b in zip(values, values[1:])), default=0)
