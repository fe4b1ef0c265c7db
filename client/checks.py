"""Local argument checks, run before anything is sent. They raise what flash_attn raises for the
same mistakes (RuntimeError with flash_attn's wording), so code that handled those keeps working."""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(message)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool) -> None:
    check(q.dtype in SUPPORTED_DTYPES,
          "FlashAttention only support fp16 and bf16 data type (flashserve's torch backend also takes fp32)")
    check(k.dtype == q.dtype, "query and key must have the same dtype")
    check(v.dtype == q.dtype, "query and value must have the same dtype")
    rank = 3 if varlen else 4
    layout = "(total, num_heads, head_size)" if varlen else "(batch_size, seqlen, num_heads, head_size)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == rank, f"{name} must have shape {layout}, got {tuple(t.shape)}")
    check(q.device == k.device == v.device, "q, k and v must be on the same device")
    head_size = q.shape[-1]
    check(head_size <= MAX_HEAD_DIM, "FlashAttention forward only supports head dimension at most 256")
    check(head_size > 0, "head dimension must be positive")
    num_heads, num_heads_k = q.shape[-2], k.shape[-2]
    check(num_heads_k > 0, "number of key/value heads must be positive")
    check(num_heads % num_heads_k == 0, "Number of heads in key/value must divide number of heads in query")
    if varlen:
        check(k.shape == (k.shape[0], num_heads_k, head_size),
              f"k must have shape (total_k, num_heads_k, head_size_og) = (*, {num_heads_k}, {head_size})")
    else:
        batch_size, seqlen_k = q.shape[0], k.shape[1]
        check(batch_size > 0, "batch size must be positive")
        check(tuple(k.shape) == (batch_size, seqlen_k, num_heads_k, head_size),
              f"k must have shape (batch_size, seqlen_k, num_heads_k, head_size_og) = "
              f"({batch_size}, {seqlen_k}, {num_heads_k}, {head_size}), got {tuple(k.shape)}")
    check(tuple(v.shape) == tuple(k.shape), f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")


def check_cu_seqlens(cu: torch.Tensor, name: str, total: int) -> int:
    """Returns the batch size."""
    check(cu.dtype == torch.int32, f"{name} must have dtype int32")
    check(cu.dim() == 1 and cu.numel() >= 2, f"{name} must be a 1-D tensor of batch_size + 1 entries")
    return cu.numel() - 1


def check_params(dropout_p: float, window_size, softcap: float, alibi_slopes: Optional[torch.Tensor],
                 batch_size: int, num_heads: int) -> None:
    check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    check(len(window_size) == 2 and all(int(w) >= -1 for w in window_size),
          f"window_size must be a pair of ints >= -1, got {window_size}")
    check(softcap >= 0.0, f"softcap must be >= 0, got {softcap}")
    if alibi_slopes is not None:
        check(alibi_slopes.dtype == torch.float32, "ALiBi slopes must have dtype fp32")
        check(tuple(alibi_slopes.shape) in ((num_heads,), (batch_size, num_heads)),
              "ALiBi slopes tensor must have shape (batch_size, num_heads) or (num_heads)")
