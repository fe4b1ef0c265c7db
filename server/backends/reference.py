"""Attention with flash_attn 2.x semantics, written with plain torch ops.

This is the `torch` backend's math and the reference the tests and `flashserve demo` compare
against. It works one sequence at a time in the packed varlen layout and computes in
`compute_dtype` (float32 by default, float64 for tests); score matrices exist only for one
block of query rows at a time, so memory stays bounded on long sequences.

Semantics (flash_attn 2.8): logits = scale * S (or softcap * tanh(scale * S / softcap)), minus
slope * |i + sk - sq - j| with ALiBi; key j is visible from query i when
i + sk - sq - window_left <= j <= i + sk - sq + window_right (-1: unbounded; causal sets
window_right = 0). Rows that see no key give out = 0 and lse = +inf. Dropout uses the mask of
csrc/common/dropout.cuh.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import AttentionParams, BackwardResult, ForwardResult
from .philox import dropout_keep_mask

ROW_BLOCK = 1024  # query rows per score block


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def effective_window(params: AttentionParams) -> Tuple[int, int]:
    left, right = params.window_left, params.window_right
    if params.causal:
        right = 0
    return left, right


def _visible(rows: torch.Tensor, seqlen_q: int, seqlen_k: int, left: int, right: int) -> Optional[torch.Tensor]:
    """Boolean (rows, seqlen_k) mask of visible keys, or None when every key is visible."""
    if left < 0 and right < 0:
        return None
    cols = torch.arange(seqlen_k, device=rows.device).view(1, -1)
    diag = rows.view(-1, 1) + (seqlen_k - seqlen_q)
    ok = torch.ones(rows.numel(), seqlen_k, dtype=torch.bool, device=rows.device)
    if right >= 0:
        ok &= cols <= diag + right
    if left >= 0:
        ok &= cols >= diag - left
    return ok


def _logits(q_blk, k_seq, rows, seqlen_q, seqlen_k, params: AttentionParams, slopes, with_slope: bool = False):
    """Masked logits (heads, rows, seqlen_k) for a block of query rows; with `with_slope`, also
    d(logits)/d(q k^T) (a number, or a tensor under softcap) for the explicit backward."""
    s = torch.matmul(q_blk, k_seq.transpose(-1, -2))
    if params.softcap > 0:
        t = torch.tanh(s * (params.softmax_scale / params.softcap))
        slope = params.softmax_scale * (1.0 - t * t) if with_slope else None  # d(cap tanh(scale s / cap)) / ds
        s = params.softcap * t
    else:
        slope = params.softmax_scale
        s = s * params.softmax_scale
    if slopes is not None:
        cols = torch.arange(seqlen_k, device=s.device, dtype=s.dtype).view(1, -1)
        dist = (rows.to(s.dtype).view(-1, 1) + (seqlen_k - seqlen_q) - cols).abs()
        s = s - slopes.to(s.dtype).view(-1, 1, 1) * dist.unsqueeze(0)
    left, right = effective_window(params)
    ok = _visible(rows, seqlen_q, seqlen_k, left, right)
    if ok is not None:
        s = s.masked_fill(~ok.unsqueeze(0), float("-inf"))
    return (s, slope) if with_slope else s


def _sequence_slopes(alibi_slopes: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
    if alibi_slopes is None:
        return None
    return alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes


def _probabilities(s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax of masked logits over keys and its log-sum-exp; a row that sees no key gets p = 0, lse = +inf."""
    # Such rows would make logsumexp -inf (and NaN downstream): finite logits here, zero probabilities below.
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(empty, 0.0)  # masked entries: exp(-inf) = 0
    return p, lse.masked_fill(empty.squeeze(-1), float("inf"))


def _dropped(x: torch.Tensor, keep: Optional[torch.Tensor], params: AttentionParams) -> torch.Tensor:
    """x with dropout's mask and 1 / (1 - p) rescaling applied (x itself without dropout)."""
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - params.dropout_p)


def _block_forward(q_blk, k_seq, v_seq, rows, seqlen_q, seqlen_k, params, slopes, keep):
    """(out, lse, probs_before_dropout) for one block; heads leading."""
    p, lse = _probabilities(_logits(q_blk, k_seq, rows, seqlen_q, seqlen_k, params, slopes))
    out = torch.matmul(_dropped(p, keep, params), v_seq)
    return out, lse, p


def _expand_kv(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(heads_k, s, d) -> (heads_q, s, d) for GQA / MQA; differentiable (gradients sum back)."""
    groups = heads_q // t.shape[0]
    return t if groups == 1 else t.repeat_interleave(groups, dim=0)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params: AttentionParams, alibi_slopes=None,
            return_softmax: bool = False, compute_dtype=torch.float32) -> ForwardResult:
    total_q, heads_q, _ = q.shape
    batch = cu_seqlens_q.numel() - 1
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((heads_q, total_q), float("inf"), dtype=torch.float32, device=q.device)
    s_dmask = None
    if return_softmax:
        s_dmask = torch.zeros(batch, heads_q, round_up(params.max_seqlen_q, 128), round_up(params.max_seqlen_k, 128),
                              dtype=q.dtype, device=q.device)
    for b in range(batch):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if sq == 0:
            continue
        k_seq = _expand_kv(k[ck[b]:ck[b + 1]].to(compute_dtype).transpose(0, 1), heads_q)
        v_seq = _expand_kv(v[ck[b]:ck[b + 1]].to(compute_dtype).transpose(0, 1), heads_q)
        slopes = _sequence_slopes(alibi_slopes, b)
        keep = None
        if params.dropout_p > 0 and sk > 0:
            keep = dropout_keep_mask(params.seed, params.offset, b * heads_q, heads_q, sq, sk, params.dropout_p,
                                     device=q.device)
        for r0 in range(0, sq, ROW_BLOCK):
            r1 = min(sq, r0 + ROW_BLOCK)
            rows = torch.arange(r0, r1, device=q.device)
            q_blk = q[cq[b] + r0:cq[b] + r1].to(compute_dtype).transpose(0, 1)
            keep_blk = None if keep is None else keep[:, r0:r1]
            o, l, p = _block_forward(q_blk, k_seq, v_seq, rows, sq, sk, params, slopes, keep_blk)
            out[cq[b] + r0:cq[b] + r1] = o.transpose(0, 1).to(q.dtype)
            lse[:, cq[b] + r0:cq[b] + r1] = l.float()
            if s_dmask is not None and sk > 0:
                signed = p if keep_blk is None else torch.where(keep_blk, p, -p)
                s_dmask[b, :, r0:r1, :sk] = signed.to(q.dtype)
    return ForwardResult(out=out, softmax_lse=lse, s_dmask=s_dmask)


def _block_backward(q_blk, k_seq, v_seq, g, rows, seqlen_q, seqlen_k, params, slopes, keep):
    """(dq, dk, dv) of one block of query rows, heads leading, by the softmax-attention gradient formulas.

    Explicit rather than through torch.autograd: an in-process server (tests, notebooks) may run this while
    the caller's autograd engine is inside our client's backward, and on CUDA a nested autograd call would wait
    for that engine's device thread, which is blocked on us."""
    s, dlogits_ds = _logits(q_blk, k_seq, rows, seqlen_q, seqlen_k, params, slopes, with_slope=True)
    p, _ = _probabilities(s)
    dv = torch.matmul(_dropped(p, keep, params).transpose(-1, -2), g)
    dp = _dropped(torch.matmul(g, v_seq.transpose(-1, -2)), keep, params)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True)) * dlogits_ds  # softmax, then logits' gradient
    return torch.matmul(ds, k_seq), torch.matmul(ds.transpose(-1, -2), q_blk), dv


def _reduce_kv(t: torch.Tensor, heads_k: int) -> torch.Tensor:
    """(heads_q, s, d) -> (heads_k, s, d): GQA / MQA gradients summed over each K/V head's query heads."""
    groups = t.shape[0] // heads_k
    return t if groups == 1 else t.view(heads_k, groups, *t.shape[1:]).sum(dim=1)


def backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, params: AttentionParams,
             alibi_slopes=None, compute_dtype=torch.float32) -> BackwardResult:
    """Gradients by recomputing each block's probabilities (out and lse are not needed: the recomputation
    is exact, and keeps this reference independent of the kernels)."""
    heads_q, heads_k = q.shape[1], k.shape[1]
    batch = cu_seqlens_q.numel() - 1
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=q.device)
    for b in range(batch):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if sq == 0 or sk == 0:
            continue
        slopes = _sequence_slopes(alibi_slopes, b)
        keep = None
        if params.dropout_p > 0:
            keep = dropout_keep_mask(params.seed, params.offset, b * heads_q, heads_q, sq, sk, params.dropout_p,
                                     device=q.device)
        k_seq = _expand_kv(k[ck[b]:ck[b + 1]].to(compute_dtype).transpose(0, 1), heads_q)
        v_seq = _expand_kv(v[ck[b]:ck[b + 1]].to(compute_dtype).transpose(0, 1), heads_q)
        dk_seq = torch.zeros_like(k_seq)
        dv_seq = torch.zeros_like(v_seq)
        for r0 in range(0, sq, ROW_BLOCK):
            r1 = min(sq, r0 + ROW_BLOCK)
            rows = torch.arange(r0, r1, device=q.device)
            q_blk = q[cq[b] + r0:cq[b] + r1].to(compute_dtype).transpose(0, 1)
            g = dout[cq[b] + r0:cq[b] + r1].to(compute_dtype).transpose(0, 1)
            gq, gk, gv = _block_backward(q_blk, k_seq, v_seq, g, rows, sq, sk, params, slopes,
                                         None if keep is None else keep[:, r0:r1])
            dq[cq[b] + r0:cq[b] + r1] = gq.transpose(0, 1)
            dk_seq += gk
            dv_seq += gv
        dk[ck[b]:ck[b + 1]] = _reduce_kv(dk_seq, heads_k).transpose(0, 1)
        dv[ck[b]:ck[b + 1]] = _reduce_kv(dv_seq, heads_k).transpose(0, 1)
    return BackwardResult(dq=dq.to(q.dtype), dk=dk.to(k.dtype), dv=dv.to(v.dtype))
