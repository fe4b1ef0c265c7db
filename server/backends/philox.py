"""Philox4x32-10 and the dropout mask of csrc/common/dropout.cuh, in torch integer ops.

The torch backend uses it so that its dropout mask is the CUDA kernels' mask bit for bit: a
forward on one backend and a backward on another still agree, and GPU tests can check the
kernels' dropout against this reference. 32-bit words are held in int64 tensors.
"""
from __future__ import annotations

import torch

_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b without overflowing int64 (b split into 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, key: int):
    """Philox4x32-10 on broadcastable int64 counter words; key is the 64-bit seed."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keep_threshold(p_drop: float) -> int:
    t = (1.0 - float(p_drop)) * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def dropout_keep_mask(seed: int, offset: int, seq_head_base: int, heads: int, seqlen_q: int, seqlen_k: int,
                      p_drop: float, device=None) -> torch.Tensor:
    """Boolean keep mask (heads, seqlen_q, seqlen_k) of one sequence whose first head has index
    seq_head_base = sequence * heads_q (so head h uses seq_head_base + h)."""
    groups = (seqlen_k + 3) // 4
    head = torch.arange(heads, dtype=torch.int64, device=device).view(-1, 1, 1) + seq_head_base
    row = torch.arange(seqlen_q, dtype=torch.int64, device=device).view(1, -1, 1)
    col_group = torch.arange(groups, dtype=torch.int64, device=device).view(1, 1, -1)
    shape = (heads, seqlen_q, groups)
    c0 = col_group.expand(shape)
    c1 = row.expand(shape)
    c2 = (head & _MASK32).expand(shape)
    c3 = torch.full(shape, offset & _MASK32, dtype=torch.int64, device=device)
    words = philox4x32_10(c0, c1, c2, c3, seed & 0xFFFFFFFFFFFFFFFF)
    threshold = keep_threshold(p_drop)
    kept = torch.stack([w < threshold for w in words], dim=-1)  # (heads, sq, groups, 4)
    return kept.reshape(heads, seqlen_q, groups * 4)[..., :seqlen_k]
