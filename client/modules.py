"""flash_attn's attention modules (flash_attn.modules.mha), computed on a flashserve server."""
from __future__ import annotations

import torch
from torch import nn

from .functional import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func)


class _Base(nn.Module):
    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False, client=None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.window_size = window_size
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.deterministic = deterministic
        self.client = client

    def _dropout_p(self) -> float:
        return self.drop.p if self.training else 0.0

    def _common(self, causal):
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(torch.float32)
        return dict(softmax_scale=self.softmax_scale, causal=self.causal if causal is None else causal,
                    alibi_slopes=slopes, window_size=self.window_size, deterministic=self.deterministic,
                    client=self.client)


class FlashSelfAttention(_Base):
    """Scaled dot-product self-attention on packed qkv.

    forward(qkv, causal=None, cu_seqlens=None, max_seqlen=None): qkv is (B, S, 3, H, D), or
    (total, 3, H, D) with cu_seqlens (int32, B + 1) and max_seqlen. Returns (B, S, H, D) / (total, H, D)."""

    def forward(self, qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            assert cu_seqlens.dtype == torch.int32 and max_seqlen is not None and isinstance(max_seqlen, int)
            return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, self._dropout_p(),
                                                    **self._common(causal))
        return flash_attn_qkvpacked_func(qkv, self._dropout_p(), **self._common(causal))


class FlashCrossAttention(_Base):
    """Scaled dot-product attention of q over packed kv.

    forward(q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None):
    q (B, Sq, H, D) and kv (B, Sk, 2, H_k, D), or varlen (total_q, H, D) and (total_k, 2, H_k, D)."""

    def forward(self, q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None):
        if cu_seqlens is not None:
            assert cu_seqlens.dtype == torch.int32 and cu_seqlens_k is not None and cu_seqlens_k.dtype == torch.int32
            assert max_seqlen is not None and isinstance(max_seqlen, int)
            assert max_seqlen_k is not None and isinstance(max_seqlen_k, int)
            return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                                   self._dropout_p(), **self._common(causal))
        return flash_attn_kvpacked_func(q, kv, self._dropout_p(), **self._common(causal))
