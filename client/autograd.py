"""The autograd Function behind every flash_attn-style call: forward over gRPC, backward over gRPC.

Works in the packed varlen layout; the public functions reshape to and from it with ordinary
(differentiable) torch ops. Results come back on the caller's device in the caller's dtype."""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from flashserve.proto import attention_pb2 as pb

from .client import Client, default_client
from .errors import ResidualsEvicted


def make_params(softmax_scale, causal, window_size, softcap, dropout_p, seed, offset, deterministic, max_seqlen_q,
                max_seqlen_k, return_softmax) -> pb.AttentionParams:
    params = pb.AttentionParams(causal=bool(causal), window_left=int(window_size[0]), window_right=int(window_size[1]),
                                softcap=float(softcap), dropout_p=float(dropout_p), seed=seed, offset=offset,
                                deterministic=bool(deterministic), max_seqlen_q=int(max_seqlen_q),
                                max_seqlen_k=int(max_seqlen_k), return_softmax=bool(return_softmax))
    if softmax_scale is not None:
        params.softmax_scale = float(softmax_scale)
    return params


def draw_seed() -> int:
    """Dropout seed from torch's default generator, so torch.manual_seed makes dropout reproducible."""
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())


def _on(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.to(device=like.device, non_blocking=False)


def wants_residuals(client: Client, needs_grad: bool) -> bool:
    if not needs_grad or client.transport == "bytes-only":
        return False
    try:
        return client.server_info().residuals
    except Exception:
        return False


class _Release:
    """Releases a residual handle when the autograd graph that could use it is freed."""

    def __init__(self, client: Client, handle: str):
        self.client, self.handle = client, handle

    def __call__(self) -> None:
        try:
            self.client.release([self.handle])
        except Exception:
            pass  # the server evicts by TTL anyway


class RemoteAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                causal, window_size, softcap, alibi_slopes, deterministic, return_softmax, client):
        client = client or default_client()
        seed = draw_seed() if dropout_p > 0 else 0
        params = make_params(softmax_scale, causal, window_size, softcap, dropout_p, seed, 0, deterministic,
                             max_seqlen_q, max_seqlen_k, return_softmax)
        needs_grad = any(ctx.needs_input_grad[:3])
        keep = wants_residuals(client, needs_grad)
        reply, outs = client.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes, keep_residuals=keep)
        out = _on(outs["out"], q)
        lse = _on(outs["softmax_lse"], q)
        s_dmask = _on(outs.get("s_dmask"), q)
        if s_dmask is None:
            s_dmask = torch.empty(0, dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
        ctx.client, ctx.params = client, params
        ctx.handle = reply.residual_handle
        if ctx.handle:
            weakref.finalize(ctx, _Release(client, ctx.handle))
        ctx.mark_non_differentiable(lse, s_dmask)
        return out, lse, s_dmask

    @staticmethod
    def backward(ctx, dout, _dlse, _ds):
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        client: Client = ctx.client
        dout = dout.contiguous()
        outs = None
        if ctx.handle:
            try:
                _, outs = client.backward(dout, ctx.params, residual_handle=ctx.handle)
            except ResidualsEvicted:
                outs = None  # evicted or restarted server: send everything again
        if outs is None:
            _, outs = client.backward(dout, ctx.params, q, k, v, out, lse, cu_q, cu_k, alibi)
        dq, dk, dv = (_on(outs[n], q) for n in ("dq", "dk", "dv"))
        return (dq, dk, dv) + (None,) * 13


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
              window_size, softcap, alibi_slopes, deterministic, return_softmax, client: Optional[Client]):
    """(out, softmax_lse, s_dmask) in the varlen layout; autograd-aware."""
    return RemoteAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                 softmax_scale, causal, tuple(window_size), softcap, alibi_slopes, deterministic,
                                 return_softmax, client)
