"""Same-host shared-memory transport, client side.

The client creates shared-memory regions, reuses them across calls (a region grows when a call needs
more), copies its input tensors into a region once and sends only (region, offset) per tensor; the
server reads them, and writes the outputs into the same region after the inputs (output_region /
output_offset), where the client copies them out once.

Two kinds of region (the server must run as the same user, on this host):
  * sealed memfd (default on Linux): an anonymous memfd_create file, sized once and sealed against
    shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), named
    `flashserve_fd_<pid>_<fd>_<token>`; the server opens it as /proc/<pid>/fd/<fd>. Because the kernel
    guarantees that such a file never shrinks, the server may map it and copy with plain memory copies
    (a mapping of a file that can shrink would turn a shrink into SIGBUS for the whole server).
    It vanishes with the last descriptor or mapping: nothing to clean up.
  * POSIX file (/dev/shm/flashserve_<pid>_<random>, mode 0600): the fallback where memfds are not
    available or the server cannot open them (e.g. another PID namespace). The server reads it with
    pread and writes with pwrite. Unlinked at close / exit.

Used automatically (Client(transport="auto")) when the server says it accepts shared memory, the target
is loopback or a unix: socket, and the server reports this host's hostname."""
from __future__ import annotations

import atexit
import concurrent.futures
import fcntl
import math
import mmap
import os
import secrets
import socket
import threading
import weakref
from typing import Dict, List, Optional

import numpy as np
import torch

from . import cuda_host
from .buffers import storage_use_count
from .wire import host_bytes

SHM_DIR = "/dev/shm"
PREFIX = "flashserve_"
ALIGN = 64
MIN_REGION = 1 << 20
MAX_VIEW_BASES = 64  # RowViews' cached bases per mapping (a varlen mix of lse shapes stays well below)
# Region.put copies a contiguous CPU tensor up to this size holding the GIL (a memory copy, no torch op); larger
# ones with copy_bytes (numpy on a few threads, which lets other threads run during the copy). Why: a torch copy_
# (and detach) releases the GIL and takes it back, once or more in the middle of the op (torch keeps the Python
# object of a tensor alive from C++ under the GIL); beside busy threads each take waits up to the switch interval
# (5 ms). Measured beside
# one Python-busy thread, 1 MB bf16: copy_ 12.8-13.4 ms, numpy 3.7-5.3 ms, this copy 0.04 ms; in a load
# generator's client process those waits were most of its samples (py-spy --native).
HELD_COPY_BYTES = 16 << 20
MEMFD_PREFIX = PREFIX + "fd_"

# Large copies into and out of mapped regions are split over a few threads (numpy releases the GIL): one thread
# moves ~6 GB/s, and the client's 64-256 MB puts ran at 0.6x the speed of torch's multithreaded copy_ (H200 host,
# shm round trips 10.7 -> 6.4 GB/s at 64 MB). numpy rather than torch: a torch copy on a helper thread starts one
# more OpenMP team, and libgomp slows every team's wake-ups (the server's compute's too) once its threads
# outnumber the cores.
COPY_SPLIT_BYTES = 16 << 20
_copy_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) // 2)),
                                                   thread_name_prefix="flashserve-shm-copy")


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src for two uint8 arrays of one length, in parts of at least COPY_SPLIT_BYTES on the pool."""
    n = len(src)
    parts = min(_copy_pool._max_workers + 1, n // COPY_SPLIT_BYTES)
    if parts < 2:
        np.copyto(dst, src)
        return
    step = -(-n // parts)
    futures = [_copy_pool.submit(np.copyto, dst[a:a + step], src[a:a + step]) for a in range(step, n, step)]
    np.copyto(dst[:step], src[:step])
    for f in futures:
        f.result()
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_SEAL", 0)


def memfd_supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") and os.path.isdir("/proc/self/fd")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1", "ip6-localhost"}


def is_local_target(target: str) -> bool:
    """True for unix: sockets and loopback addresses (host:port, ipv4:/ipv6:/dns: schemes)."""
    t = target.strip()
    if t.startswith("unix:"):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
            break
    hosts = []
    for addr in t.split(","):
        if addr.startswith("["):
            hosts.append(addr[1:addr.find("]")])
        elif addr.count(":") == 1:
            hosts.append(addr.rsplit(":", 1)[0])
        else:
            hosts.append(addr)
    return bool(hosts) and all(h in _LOOPBACK or h.startswith("127.") for h in hosts)


def same_host(server_hostname: str) -> bool:
    return not server_hostname or server_hostname == socket.gethostname()


class RowViews:
    """Tensor views of one mapping made by indexing cached bases, for client regions and the server's mappings.

    A view of dtype and shape at a byte offset is rows [first, first + shape[0]) of a base tensor of rows shaped like
    shape[1:] that starts at byte offset % row size; bases are kept per (dtype, row shape, that phase), at most
    MAX_VIEW_BASES. Indexing keeps the GIL, while torch ops (view, as_strided) release it, and getting it back can
    wait for another thread's switch interval (5 ms): beside one Python-busy thread, a client request's puts and
    output views took 59 ms instead of 0.1 ms with view ops, and the GPU process's per-request path 324 us instead
    of 149 (bench/engine_requests.py --gil-contention).

    make_base(phase, rows, dtype, row_shape) builds a base; count_refs, when given, is read before and after each
    base is made, and `refs` sums the difference (a client region discounts its bases' storage references)."""

    def __init__(self, size: int, make_base, count_refs=None):
        self.size = size
        self._make = make_base
        self._count = count_refs
        self._bases: Dict[tuple, torch.Tensor] = {}
        self.refs = 0

    def __len__(self) -> int:
        return len(self._bases)

    def view(self, offset: int, dtype: torch.dtype, shape: tuple) -> Optional[torch.Tensor]:
        """The view, or None where no base applies (a 0-d or empty row shape, an offset not a multiple of the
        itemsize). The caller checks bounds first."""
        itemsize = dtype.itemsize
        row = itemsize * math.prod(shape[1:])
        if not shape or row == 0 or offset % itemsize:
            return None
        phase = offset % row
        key = (dtype, shape[1:], phase)
        base = self._bases.get(key)
        if base is None:
            if len(self._bases) >= MAX_VIEW_BASES:
                self.clear()
            before = self._count() if self._count else 0
            base = self._bases[key] = self._make(phase, (self.size - phase) // row, dtype, shape[1:])
            if self._count:
                self.refs += self._count() - before
        first = (offset - phase) // row
        return base[first:first + shape[0]]

    def clear(self) -> None:
        self._bases.clear()
        self.refs = 0


class Region:
    """One shared-memory region this process created: a sealed memfd (memfd=True, the default where
    supported) or a /dev/shm file (memfd=False)."""

    def __init__(self, size: int, memfd: Optional[bool] = None):
        self.size = max(MIN_REGION, align(size))
        self.memfd = memfd_supported() if memfd is None else memfd
        token = secrets.token_hex(6)
        if self.memfd:
            fd = os.memfd_create(f"{PREFIX}{token}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self.name = f"{MEMFD_PREFIX}{os.getpid()}_{fd}_{token}"
            self.path = f"/proc/{os.getpid()}/fd/{fd}"
        else:
            self.name = f"{PREFIX}{os.getpid()}_{token}"
            self.path = os.path.join(SHM_DIR, self.name)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, self.size)
            if self.memfd:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mmap = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            if not self.memfd:
                os.unlink(self.path)
            raise
        if self.memfd:
            self._fd = fd  # the server finds the region through this descriptor: it stays open
            self._finalizer = weakref.finalize(self, os.close, fd)
        else:
            os.close(fd)
            self._fd = None
            self._finalizer = weakref.finalize(self, _unlink, self.path)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._mem = memoryview(self._mmap)  # put's plain byte copies
        self._views = RowViews(self.size, self._make_base, lambda: storage_use_count(self._bytes))
        self._pinned: Optional[bool] = None  # page-locked for CUDA copies (see pin)
        self._unpin = None

    def pin(self) -> bool:
        """Page-lock the region (cudaHostRegister) so that copies from and to CUDA tensors run at full bus speed;
        once, undone at close. False where that is not possible (then copies are merely slower)."""
        if self._pinned is None:
            self._pinned = False
            if self._bytes is not None and cuda_host.available():
                ptr, size = self._bytes.data_ptr(), -(-self.size // mmap.PAGESIZE) * mmap.PAGESIZE
                if cuda_host.register(ptr, size):
                    self._pinned = True
                    self._unpin = weakref.finalize(self, cuda_host.unregister, ptr)
        return self._pinned

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """The tensor of dtype and shape at offset, on the region's memory (no copy; see RowViews)."""
        shape = tuple(map(int, shape))
        n = dtype.itemsize * math.prod(shape)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"slice [{offset}, {offset + n}) outside region {self.name} of {self.size} bytes")
        view = self._views.view(offset, dtype, shape)
        return view if view is not None else self._bytes[offset:offset + n].view(dtype).view(shape)

    def _make_base(self, phase: int, rows: int, dtype: torch.dtype, row_shape: tuple) -> torch.Tensor:
        row = dtype.itemsize * math.prod(row_shape)
        return self._bytes[phase:phase + rows * row].view(dtype).view((rows, *row_shape))

    def put(self, tensor: torch.Tensor, offset: int) -> int:
        """Copy tensor (any device, any layout) to offset; returns its byte size. A contiguous CPU tensor is copied
        as bytes, with no torch op (see HELD_COPY_BYTES); anything else with torch's copy."""
        n = tensor.numel() * tensor.element_size()
        src = host_bytes(tensor)
        if src is not None:
            if offset < 0 or offset + n > self.size:
                raise ValueError(f"slice [{offset}, {offset + n}) outside region {self.name} of {self.size} bytes")
            if n <= HELD_COPY_BYTES:
                self._mem[offset:offset + n] = src
            else:
                copy_bytes(np.frombuffer(self._mem, np.uint8, n, offset), np.frombuffer(src, np.uint8))
            return n
        t = tensor.detach()
        self.view(offset, t.dtype, t.shape).copy_(t)
        return n

    def idle(self) -> bool:
        """No tensor views this region's memory any more (one reference is our own, one the check's, one each
        view's cached base)."""
        return self._bytes is not None and storage_use_count(self._bytes) == 2 + self._views.refs

    def take(self, offset: int, dtype: torch.dtype, shape, allocate=None) -> torch.Tensor:
        """A copy of the tensor at offset (the region is reused by the next call); `allocate(nbytes)` gives
        the uint8 buffer to copy into (default: a fresh one)."""
        src = self.view(offset, dtype, shape)
        nbytes = src.numel() * src.element_size()
        if allocate is None or nbytes == 0:
            out = torch.empty(src.shape, dtype=dtype)
        else:
            out = allocate(nbytes).view(dtype).view(src.shape)
        out.copy_(src)
        return out

    def close(self) -> None:
        if self._unpin is not None:  # before the mapping can go
            self._unpin()
        self._finalizer()
        # Drop our references rather than unmap: results handed out are views of output regions, and each view
        # holds the mapping (torch.frombuffer keeps the mmap object), so it goes with the last of them.
        self._bytes = None
        self._views.clear()
        self._mem = None
        self._mmap = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RegionPool:
    """Regions for concurrent calls of one client; each call holds one input region exclusively.

    Output regions are separate: a call's results are returned as views of its output region (no copy
    out), and that region is lent again only once no such view is alive. A caller that keeps its results
    keeps only their region, sized for them; `max_idle_output_bytes` bounds the idle ones kept for reuse."""

    def __init__(self, memfd: Optional[bool] = None, max_idle_output_bytes: int = 1 << 30):
        self._lock = threading.Lock()
        self._free: List[Region] = []
        self._all: List[Region] = []
        self._outputs: List[Region] = []  # output regions, least recently lent first
        self._lent: set = set()  # output regions of calls in flight
        self.max_idle_output_bytes = max_idle_output_bytes
        self.created = 0
        self.memfd = memfd_supported() if memfd is None else memfd
        atexit.register(self.close)

    def acquire_output(self, size: int) -> Region:
        """An output region of at least `size` bytes, for one call; give it back with release_output once the
        result views exist (it is reused only after they are gone)."""
        drop: List[Region] = []
        with self._lock:
            idle = [r for r in self._outputs if id(r) not in self._lent and r.memfd == self.memfd and r.idle()]
            fits = [r for r in idle if size <= r.size <= 2 * max(size, MIN_REGION)]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._outputs.remove(region)
            else:
                idle_bytes = sum(r.size for r in idle)
                for r in idle:  # oldest first, down to the bound
                    if idle_bytes + size <= self.max_idle_output_bytes:
                        break
                    drop.append(r)
                    idle_bytes -= r.size
                self._outputs = [r for r in self._outputs if r not in drop]
                region = None
        for r in drop:
            r.close()
        created = region is None
        if created:
            region = Region(max(size, size + size // 4), memfd=self.memfd)
        with self._lock:
            self._outputs.append(region)
            self._lent.add(id(region))
            self.created += int(created)
        return region

    def release_output(self, region: Region) -> None:
        with self._lock:
            self._lent.discard(id(region))

    def regions(self) -> List[Region]:
        with self._lock:
            return self._all + self._outputs

    def use_files(self) -> None:
        """From now on create /dev/shm file regions (the server could not open our memfds)."""
        with self._lock:
            self.memfd = False
            stale = [r for r in self._free if r.memfd]
            self._free = [r for r in self._free if not r.memfd]
            self._all = [r for r in self._all if r not in stale]
            idle_out = [r for r in self._outputs if r.memfd and id(r) not in self._lent and r.idle()]
            self._outputs = [r for r in self._outputs if r not in idle_out]
        for r in stale + idle_out:
            r.close()

    def acquire(self, size: int) -> Region:
        with self._lock:
            best: Optional[Region] = None
            for r in self._free:
                if r.size >= size and (best is None or r.size < best.size):
                    best = r
            if best is not None:
                self._free.remove(best)
                return best
            if self._free:  # grow: replace the largest free region rather than keep both
                old = max(self._free, key=lambda r: r.size)
                self._free.remove(old)
                self._all.remove(old)
                old.close()
            region = Region(max(size, size + size // 4), memfd=self.memfd)
            self._all.append(region)
            self.created += 1
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            if region not in self._all:
                return
            if region.memfd == self.memfd:
                self._free.append(region)
                return
            self._all.remove(region)  # a memfd region after use_files(): not used again
        region.close()

    def names(self) -> List[str]:
        return [r.name for r in self.regions()]

    def close(self) -> None:
        with self._lock:
            regions, self._all, self._free, self._outputs = self._all + self._outputs, [], [], []
        for r in regions:
            r.close()
