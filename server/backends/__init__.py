"""Compute backends: `torch` (reference ops, CPU or CUDA) and `flash` (our CUDA kernels)."""
from __future__ import annotations

import logging

import torch

from .base import AttentionParams, Backend, BackwardResult, Capabilities, ForwardResult

log = logging.getLogger(__name__)

NAMES = ("auto", "flash", "torch")


def flash_available() -> tuple[bool, str]:
    """(usable, why not) for the compiled kernels on this machine."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from .flash import FlashBackend  # noqa: F401
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def create_backend(name: str = "auto", device: str | None = None) -> Backend:
    """`auto` picks `flash` on a GPU with the extension built, else `torch` (on CUDA when present)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend '{name}'; choose one of {', '.join(NAMES)}")
    if name in ("auto", "flash"):
        ok, why = flash_available()
        if ok:
            from .flash import FlashBackend

            return FlashBackend(device or "cuda")
        if name == "flash":
            raise RuntimeError(f"the flash backend is not available: {why}")
        log.info("flash backend unavailable (%s); using torch", why)
    from .torch_backend import TorchBackend

    return TorchBackend(device or ("cuda" if torch.cuda.is_available() else "cpu"))


__all__ = ["AttentionParams", "Backend", "BackwardResult", "Capabilities", "ForwardResult", "create_backend",
           "flash_available", "NAMES"]
