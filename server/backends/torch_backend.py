"""The `torch` backend: flash_attn semantics with plain torch ops, on CPU or CUDA.

It implements every feature (it is the reference), computing in float32 (float64 for float64
inputs) one block of query rows at a time. It is the CPU server's backend and the fallback on a
GPU without the compiled kernels.
"""
from __future__ import annotations

import torch

from . import reference
from .base import FEATURES, Backend, Capabilities


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str | torch.device = "cpu"):
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=256,
                            features=FEATURES, backward=True)

    @staticmethod
    def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None, return_softmax=False):
        return reference.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes, return_softmax,
                                 compute_dtype=self._compute_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None):
        return reference.backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes,
                                  compute_dtype=self._compute_dtype(q.dtype))
