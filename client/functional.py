"""The flash_attn 2.x function API (same names, arguments, defaults, shapes and return values),
computed on a flashserve server. Each function also takes `client=` to pick a server other than
the default one (flashserve.connect / FLASHSERVE_TARGET).

Returns `out`, or with return_attn_probs=True `(out, softmax_lse, S_dmask)`: softmax_lse is
(batch, nheads, seqlen_q) for fixed-length inputs and (nheads, total_q) for varlen ones; S_dmask
is (batch, nheads, round128(seqlen_q), round128(seqlen_k)) with dropped entries negated."""
from __future__ import annotations

import torch

from . import checks
from .autograd import attention


def _cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _fixed(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, client):
    checks.check_qkv(q, k, v, varlen=False)
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    checks.check_params(dropout_p, window_size, softcap, alibi_slopes, batch, heads)
    out, lse, s_dmask = attention(
        q.reshape(batch * seqlen_q, heads, dim), k.reshape(batch * seqlen_k, heads_k, dim),
        v.reshape(batch * seqlen_k, heads_k, dim), _cu_seqlens(batch, seqlen_q, "cpu"),
        _cu_seqlens(batch, seqlen_k, "cpu"), seqlen_q, seqlen_k, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs, client)
    out = out.view(batch, seqlen_q, heads, dim)
    if not return_attn_probs:
        return out
    lse = lse.view(heads, batch, seqlen_q).transpose(0, 1).contiguous()
    return out, lse, s_dmask


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, client, block_table=None):
    if block_table is not None:
        raise NotImplementedError("flashserve does not support a paged KV cache (block_table)")
    checks.check_qkv(q, k, v, varlen=True)
    batch = checks.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    batch_k = checks.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    checks.check(batch == batch_k, "cu_seqlens_q and cu_seqlens_k must have the same length (batch_size + 1)")
    checks.check_params(dropout_p, window_size, softcap, alibi_slopes, batch, q.shape[1])
    out, lse, s_dmask = attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, client)
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, client=None):
    """q: (batch, seqlen_q, nheads, d); k, v: (batch, seqlen_k, nheads_k, d)."""
    return _fixed(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, client)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              client=None):
    """qkv: (batch, seqlen, 3, nheads, d)."""
    checks.check(qkv.dim() == 5 and qkv.shape[2] == 3, f"qkv must have shape (batch, seqlen, 3, nheads, d), "
                                                       f"got {tuple(qkv.shape)}")
    return _fixed(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, client)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             client=None):
    """q: (batch, seqlen_q, nheads, d); kv: (batch, seqlen_k, 2, nheads_k, d)."""
    checks.check(kv.dim() == 5 and kv.shape[2] == 2, f"kv must have shape (batch, seqlen_k, 2, nheads_k, d), "
                                                     f"got {tuple(kv.shape)}")
    return _fixed(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, client)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, client=None):
    """q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_*: int32 (batch + 1)."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, client, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, client=None):
    """qkv: (total, 3, nheads, d)."""
    checks.check(qkv.dim() == 4 and qkv.shape[1] == 3, f"qkv must have shape (total, 3, nheads, d), "
                                                       f"got {tuple(qkv.shape)}")
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, client)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, client=None):
    """q: (total_q, nheads, d); kv: (total_k, 2, nheads_k, d)."""
    checks.check(kv.dim() == 4 and kv.shape[1] == 2, f"kv must have shape (total_k, 2, nheads_k, d), "
                                                     f"got {tuple(kv.shape)}")
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, client)


# flash_attn 1.x names
flash_attn_unpadded_func = flash_attn_varlen_func
flash_attn_unpadded_qkvpacked_func = flash_attn_varlen_qkvpacked_func
flash_attn_unpadded_kvpacked_func = flash_attn_varlen_kvpacked_func
