"""Keep freed large buffers in the process's heap for reuse (glibc's allocator), so that moving large messages does
not fault fresh pages in on every transfer.

A gRPC chunk is a new `bytes` object of up to a few MB each time (decoded on receipt, encoded to send). glibc serves
such sizes from fresh mmap()s or returns the heap's free top to the system once it passes a small threshold, so
every transfer touches new pages: the kernel zeroes each one and faults it in, about a page fault per 4 KB. On the
2-core CPU machine a 64 MB forward round trip over the gRPC chunk path spent 10-15 ms of its server's event-loop CPU
that way (bench/results/wire_heap_2026-12-04_cpu_session10.md); with the settings below the freed chunks are
reused instead. The cost: up to `keep_bytes` of freed memory per heap stays with the process.

The server applies this at start (`--heap-keep-mb`); a Client from its first call that sends 16 MB or more over gRPC
chunks (Client(heap_keep_bytes=0) leaves the process alone: the settings hold for the whole process). Elsewhere than
glibc (musl, macOS) nothing changes."""
from __future__ import annotations

import ctypes
import sys
import threading

M_TRIM_THRESHOLD = -1  # free memory at a heap's top kept instead of returned to the system
M_TOP_PAD = -2  # extra memory asked for whenever a heap grows
M_MMAP_THRESHOLD = -3  # allocations at least this large get their own mmap (and unmap when freed)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: chunks up to 32 MB come from the heap
TOP_PAD = 16 << 20

_lock = threading.Lock()
_applied = [0]  # the keep_bytes in force (0: not applied)


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory(keep_bytes: int = 256 << 20) -> bool:
    """Let this process keep up to keep_bytes of freed heap memory for reuse and serve allocations up to 32 MB from
    its heaps. Returns whether the allocator took the settings (False where it is not glibc, or keep_bytes <= 0).
    Idempotent; a larger keep_bytes than the one in force raises it."""
    if keep_bytes <= 0:
        return False
    with _lock:
        if _applied[0] >= keep_bytes:
            return True
        mallopt = _mallopt()
        if mallopt is None:
            return False
        limit = min(int(keep_bytes), 2**31 - 1)  # mallopt takes an int
        # (glibc's mallopt returns 1 on success; musl's is a stub that returns 0)
        ok = all(mallopt(param, value) == 1 for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                  (M_TRIM_THRESHOLD, limit), (M_TOP_PAD, TOP_PAD)))
        if ok:
            _applied[0] = keep_bytes
        return ok
