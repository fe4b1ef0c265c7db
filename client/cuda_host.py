"""Page-locking existing host memory (cudaHostRegister) for fast copies to and from the GPU.

Both ends use it on shared-memory regions: the server on its mapping of a client's region, a client on its own
regions when its tensors are on a GPU. torch.cuda.cudart() has cudaHostRegister but not cudaGetLastError, and a
failed registration leaves the CUDA runtime's per-thread "last error" set: torch's next kernel-launch check on that
thread would then raise it inside an unrelated call. So this calls the runtime library torch itself loaded (the same
instance, found among the process's mappings) and clears the error after a failure. Where that library cannot be
found (a statically linked runtime), nothing is registered: copies then take the staging path, correct if slower."""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

PORTABLE = 1  # cudaHostRegisterPortable: usable from every CUDA context of the process


@functools.lru_cache(maxsize=None)
def _runtime() -> Optional[ctypes.CDLL]:
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()  # loads the runtime
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith("libcudart.so"):
            lib = ctypes.CDLL(path)  # already loaded: dlopen hands back that same instance
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            for fn in (lib.cudaHostRegister, lib.cudaHostUnregister, lib.cudaGetLastError):
                fn.restype = ctypes.c_int
            return lib
    return None


def available() -> bool:
    return _runtime() is not None


def register(address: int, size: int) -> bool:
    """Page-lock [address, address + size) (page-aligned); False, with no error left behind, if it fails."""
    lib = _runtime()
    if lib is None or size <= 0:
        return False
    if lib.cudaHostRegister(address, size, PORTABLE) != 0:
        lib.cudaGetLastError()
        return False
    return True


def unregister(address: int) -> None:
    lib = _runtime()
    if lib is not None and lib.cudaHostUnregister(address) != 0:
        lib.cudaGetLastError()
