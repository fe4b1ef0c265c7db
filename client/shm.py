"""Same-host shared-memory transport, client side.

The client creates POSIX shared-memory regions (/dev/shm/flashserve_<pid>_<random>, mode 0600: the
server must run as the same user), reuses them across calls (a region grows when a call needs more),
copies its input tensors into a region once and sends only (region, offset) per tensor; the server
reads them, and writes the outputs into the same region after the inputs (output_region /
output_offset), where the client copies them out once. Regions are unlinked at close / exit.

Used automatically (Client(transport="auto")) when the server says it accepts shared memory, the target
is loopback or a unix: socket, and the server reports this host's hostname."""
from __future__ import annotations

import atexit
import mmap
import os
import secrets
import socket
import threading
import weakref
from typing import List, Optional

import torch

SHM_DIR = "/dev/shm"
PREFIX = "flashserve_"
ALIGN = 64
MIN_REGION = 1 << 20


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


class Region:
    """One shared-memory region this process created."""

    def __init__(self, size: int):
        self.size = max(MIN_REGION, align(size))
        self.name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._mmap = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        itemsize = dtype.itemsize
        n = itemsize
        for s in shape:
            n *= int(s)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"slice [{offset}, {offset + n}) outside region {self.name} of {self.size} bytes")
        return self._bytes[offset:offset + n].view(dtype).view(tuple(shape))

    def put(self, tensor: torch.Tensor, offset: int) -> int:
        """Copy tensor (any device, any layout) to offset; returns its byte size."""
        t = tensor.detach()
        self.view(offset, t.dtype, t.shape).copy_(t)
        return t.numel() * t.element_size()

    def take(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A copy of the tensor at offset (the region is reused by the next call)."""
        src = self.view(offset, dtype, shape)
        out = torch.empty(src.shape, dtype=dtype)
        out.copy_(src)
        return out

    def close(self) -> None:
        self._finalizer()
        self._bytes = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive; the mapping goes with it
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RegionPool:
    """Regions for concurrent calls of one client; each call holds one region exclusively."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: List[Region] = []
        self._all: List[Region] = []
        self.created = 0
        atexit.register(self.close)

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
            region = Region(max(size, size + size // 4))
            self._all.append(region)
            self.created += 1
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            if region in self._all:
                self._free.append(region)

    def names(self) -> List[str]:
        with self._lock:
            return [r.name for r in self._all]

    def close(self) -> None:
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for r in regions:
            r.close()
