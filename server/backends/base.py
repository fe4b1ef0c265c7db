"""The interface every compute backend implements.

All tensors arrive in the packed varlen layout on the backend's device:
  q: (total_q, heads_q, head_dim)   k, v: (total_k, heads_k, head_dim)   cu_seqlens_*: int32 (batch + 1,)
  out: like q                        softmax_lse: float32 (heads_q, total_q)
Fixed-length batches are flattened to this form by the client, so backends see one layout.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class AttentionParams:
    """Everything but the tensors that decides the result of one attention call."""

    softmax_scale: float
    causal: bool = False
    window_left: int = -1  # -1: unbounded
    window_right: int = -1  # -1: unbounded (causal forces 0)
    softcap: float = 0.0  # 0: off
    dropout_p: float = 0.0
    seed: int = 0  # dropout RNG (Philox key); see csrc/common/dropout.cuh
    offset: int = 0  # dropout RNG counter offset
    deterministic: bool = False
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


@dataclasses.dataclass
class ForwardResult:
    out: torch.Tensor
    softmax_lse: torch.Tensor
    s_dmask: Optional[torch.Tensor] = None  # (batch, heads_q, round128(max_q), round128(max_k)) when asked


@dataclasses.dataclass
class BackwardResult:
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Capabilities:
    dtypes: tuple  # torch dtypes accepted
    max_head_dim: int
    features: tuple  # subset of FEATURES this backend implements
    backward: bool
    head_dim_classes: tuple = ()  # kernels built for these classes (HEAD_DIM_CLASSES); (): every head dim to max


# A head dim d runs in the kernels of the smallest class >= d (csrc/fwd/fwd_dispatch.cu, csrc/bwd/bwd_api.cu); a
# development build of the extension may hold only some classes (FLASHSERVE_HEADDIMS).
HEAD_DIM_CLASSES = (32, 64, 96, 128, 192, 256)


def head_dim_class(head_dim: int) -> int:
    return next((c for c in HEAD_DIM_CLASSES if head_dim <= c), 0)


FEATURES = ("causal", "window", "softcap", "alibi", "dropout", "gqa", "return_softmax", "deterministic", "varlen")


class Backend(abc.ABC):
    name: str = "abstract"

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: AttentionParams,
                alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False) -> ForwardResult: ...

    @abc.abstractmethod
    def backward(self, dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, params: AttentionParams,
                 alibi_slopes: Optional[torch.Tensor] = None) -> BackwardResult: ...

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"
