"""The `flash` backend: flashserve's own CUDA kernels (flashserve._C, built from csrc/).

Importing this module raises ImportError with a clear message where the extension is not built
(CPU-only installs) or no CUDA device is usable, so `--backend auto` can fall back.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import FEATURES, AttentionParams, Backend, BackwardResult, Capabilities, ForwardResult

try:
    from flashserve import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "flashserve._C is not built: install on a machine with a CUDA toolkit and a CUDA build of torch "
        "(pip install -e . builds csrc/; FLASHSERVE_BUILD_EXT=1 makes a missing toolkit an error) "
        f"[{exc}]"
    ) from exc

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_FWD_FEATURES = ("causal", "window", "softcap", "alibi", "dropout", "gqa", "return_softmax", "varlen")


def _as_int64(x: int) -> int:
    """Seeds/offsets are uint64 on the device; pybind takes int64."""
    x = int(x) & 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """t on device as dtype; no torch call when it already is (each call may wait to get the GIL back)."""
    return t if (t.device == device and t.dtype == dtype) else t.to(device=device, dtype=dtype)


def _max_seqlen(cu: torch.Tensor, given: int) -> int:
    if given and given > 0:
        return int(given)
    if cu.numel() < 2:
        return 0
    return int((cu[1:] - cu[:-1]).max().item())


class FlashBackend(Backend):
    name = "flash"

    def __init__(self, device: Optional[torch.device] = None, num_splits: int = 0):
        if not torch.cuda.is_available():
            raise ImportError("flashserve._C is built but no CUDA device is available")
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            raise ValueError(f"the flash backend runs on CUDA devices, got {dev}")
        self._device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.num_splits = int(num_splits)  # 0: chosen per call by the kernel's heuristic
        cfg = _C.compiled_configs()
        self._dtypes = tuple(_DTYPES[d] for d in cfg["dtypes"])
        self._head_dims = tuple(cfg["head_dims"])

    @property
    def device(self) -> torch.device:
        return self._device

    def capabilities(self) -> Capabilities:
        has_bwd = hasattr(_C, "bwd")
        feats = _FWD_FEATURES + (("deterministic",) if has_bwd else ())
        return Capabilities(
            dtypes=self._dtypes,
            max_head_dim=max(self._head_dims) if self._head_dims else 0,
            features=tuple(f for f in FEATURES if f in feats),
            backward=has_bwd,
            head_dim_classes=self._head_dims,
        )

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: AttentionParams,
                alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False) -> ForwardResult:
        cu_q = _on(cu_seqlens_q, q.device, torch.int32)
        cu_k = _on(cu_seqlens_k, q.device, torch.int32)
        if alibi_slopes is not None:
            alibi_slopes = _on(alibi_slopes, q.device, torch.float32)
        # Head dims that are not a multiple of 8 are zero-padded (and the output sliced back) in _C.fwd.
        out, lse, s_dmask = _C.fwd(
            q, k, v, cu_q, cu_k,
            _max_seqlen(cu_q, params.max_seqlen_q), _max_seqlen(cu_k, params.max_seqlen_k),
            float(params.softmax_scale), bool(params.causal),
            int(params.window_left), int(params.window_right), float(params.softcap),
            alibi_slopes, float(params.dropout_p), _as_int64(params.seed), _as_int64(params.offset),
            bool(return_softmax), self.num_splits,
        )
        return ForwardResult(out=out, softmax_lse=lse, s_dmask=s_dmask)

    def backward(self, dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, params: AttentionParams,
                 alibi_slopes: Optional[torch.Tensor] = None) -> BackwardResult:
        if not hasattr(_C, "bwd"):
            raise NotImplementedError(
                "the flash backend's backward pass is not built yet (flashserve._C has no bwd); "
                "use the cpu/torch backend for backward")
        cu_q = _on(cu_seqlens_q, q.device, torch.int32)
        cu_k = _on(cu_seqlens_k, q.device, torch.int32)
        dq, dk, dv = _C.bwd(
            dout, q, k, v, out, softmax_lse, cu_q, cu_k,
            _max_seqlen(cu_q, params.max_seqlen_q), _max_seqlen(cu_k, params.max_seqlen_k),
            float(params.softmax_scale), bool(params.causal),
            int(params.window_left), int(params.window_right), float(params.softcap),
            alibi_slopes, float(params.dropout_p), _as_int64(params.seed), _as_int64(params.offset),
            bool(params.deterministic),
        )
        return BackwardResult(dq=dq, dk=dk, dv=dv)
