"""Same-host shared-memory transport, server side (enabled by --allow-shm).

A client on this host puts its tensors in a shared-memory region it created and sends only
`ShmSlice{region, offset}` per tensor; it may also name a region (output_region, output_offset) for the
outputs. Each byte is copied once each way (into the server's own buffer, pinned staging on CUDA, and
from the results into the region), and nothing outside [offset, offset + nbytes) of a region is touched.

Two kinds of region (see the client's flashserve/shm.py):
  * `flashserve_fd_<pid>_<fd>_<token>`: a memfd of the client, opened as /proc/<pid>/fd/<fd> after
    checking that this descriptor is the flashserve memfd of that token and that it is sealed against
    shrinking (F_SEAL_SHRINK). Such a file can never become shorter than what was mapped, so the server
    maps it (mappings are cached across calls: the client reuses its regions) and copies with memcpy
    speed; a client can never turn a mapping into SIGBUS for the whole server. On CUDA such a mapping
    is also page-locked (cudaHostRegister, within --shm-pin-bytes): the GPU then copies the large inputs
    straight out of the client's region and the outputs straight into it, with no staging copy at all.
  * `flashserve_<anything>`: a file in /dev/shm. Its size can change at any time, so it is never mapped:
    the server reads with pread and writes with pwrite, and a client that shrinks, unlinks or rewrites
    it mid-call can make only that call fail.

Checks, each an INVALID_ARGUMENT naming the tensor: region names must start with `flashserve_`, contain
no path separator and name an existing regular file in /dev/shm (or a sealed flashserve memfd); offsets
must be non-negative, aligned to the element size, and the slice must lie inside the region's size."""
from __future__ import annotations

import collections
import errno
import fcntl
import functools
import math
import mmap
import os
import re
import stat
import threading
from typing import Callable, Dict, List, Optional, Set

import grpc
import numpy as np
import torch

from flashserve import cuda_host
from flashserve.shm import MAX_VIEW_BASES, RowViews, copy_bytes
from flashserve.proto import attention_pb2 as pb
from flashserve.wire import ITEMSIZE, PROTO_TO_TORCH, describe

from . import metrics
from .validation import RequestError

SHM_DIR = "/dev/shm"
PREFIX = "flashserve_"
_NAME = re.compile(r"^/?flashserve_[A-Za-z0-9_.-]{1,200}$")
_MEMFD_NAME = re.compile(r"^flashserve_fd_([0-9]{1,10})_([0-9]{1,10})_([A-Za-z0-9]{1,64})$")
MAX_MAPPED = 256  # memfd regions kept mapped across calls
_SHM_IN, _SHM_OUT = metrics.SHM_BYTES.labels("in"), metrics.SHM_BYTES.labels("out")
ALIGN = 64  # output slices start on 64-byte boundaries
SMALL_BYTES = 64 << 10  # tensors up to this size (cu_seqlens, alibi slopes) are copied into plain CPU memory
ITEMSIZE_OF = {dtype: dtype.itemsize for dtype in PROTO_TO_TORCH.values()}
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_}


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@functools.lru_cache(maxsize=4096)  # asked several times per request about the same few names
def is_memfd_name(name: str) -> bool:
    return bool(_MEMFD_NAME.match(name or ""))


def region_path(name: str, field: str) -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise _invalid(f"{field}: shared-memory region name {name[:80]!r} is not a flashserve region "
                       f"(expected '{PREFIX}...' without '/')")
    return os.path.join(SHM_DIR, name.lstrip("/"))


class _Region:
    """A /dev/shm region file, read with pread and written with pwrite; its size is re-read on every access
    (the client may resize it)."""

    def __init__(self, name: str, field: str, writable: bool):
        path = region_path(name, field)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise _invalid(f"{field}: unknown shared-memory region {name!r} (not in {SHM_DIR} on the server's "
                           "host: is the client on this host?)") from None
        except OSError as exc:
            raise _invalid(f"{field}: cannot open shared-memory region {name!r}: "
                           f"{errno.errorcode.get(exc.errno, exc.errno)}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise _invalid(f"{field}: {name!r} is not a shared-memory region")
        self.name = name

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def check(self, offset: int, nbytes: int, itemsize: int, field: str) -> None:
        size = self.size()
        if offset < 0 or nbytes < 0:
            raise _invalid(f"{field}: negative offset {offset} in region {self.name!r}")
        if offset % itemsize:
            raise _invalid(f"{field}: offset {offset} is not a multiple of the element size {itemsize}")
        if offset + nbytes > size:
            raise _invalid(f"{field}: bytes [{offset}, {offset + nbytes}) lie outside region {self.name!r} "
                           f"of {size} bytes")

    def read_into(self, dst: torch.Tensor, offset: int, field: str) -> None:
        view = memoryview(dst.numpy()).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise _invalid(f"{field}: reading region {self.name!r} failed: {exc.strerror}") from None
            if n <= 0:  # the region shrank under us
                raise _invalid(f"{field}: region {self.name!r} ended at byte {offset + done} while reading "
                               f"[{offset}, {offset + len(view)}) (resized or removed mid-call)")
            done += n

    def write_from(self, src: torch.Tensor, offset: int, field: str) -> None:
        t = src.detach().contiguous().reshape(-1)
        if t.numel() == 0:
            return
        view = memoryview(t.view(torch.uint8).numpy())
        end = offset + len(view)
        done = 0
        while done < len(view):
            if self.size() < end:  # never grow (write outside) a region that shrank mid-call
                raise _invalid(f"{field}: region {self.name!r} shrank below {end} bytes while writing outputs")
            n = os.pwritev(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise _invalid(f"{field}: writing region {self.name!r} failed")
            done += n

    def close(self) -> None:
        os.close(self.fd)


class HostPinner:
    """Page-locks mapped client regions for direct GPU copies, within a byte budget.

    Registering costs about a millisecond per 100 MB, once per region (mappings are cached); pinned bytes
    cannot be swapped out, hence the budget. A region that cannot be pinned is copied through staging."""

    def __init__(self, budget_bytes: int, register: Callable[[int, int], bool] = cuda_host.register,
                 unregister: Callable[[int, int], None] = lambda addr, size: cuda_host.unregister(addr)):
        self.budget_bytes = budget_bytes
        self.pinned_bytes = 0
        self.pins = 0  # successful registrations, for tests and metrics
        self._register, self._unregister = register, unregister

    def pin(self, addr: int, size: int) -> bool:
        if size <= 0 or self.pinned_bytes + size > self.budget_bytes:
            return False
        if not self._register(addr, size):
            return False
        self.pinned_bytes += size
        self.pins += 1
        return True

    def unpin(self, addr: int, size: int) -> None:
        self._unregister(addr, size)
        self.pinned_bytes -= size


_PAGE = mmap.PAGESIZE


def _as_tensor(raw: np.ndarray, dtype: torch.dtype, shape) -> torch.Tensor:
    """A uint8 numpy array's bytes as a tensor of dtype and shape (no copy). Made through numpy, so no torch op runs
    (bfloat16: one): a torch op releases the GIL, and getting it back can wait for another thread's switch interval."""
    if dtype in NUMPY_DTYPES:
        return torch.from_numpy(raw.view(NUMPY_DTYPES[dtype]).reshape(shape))
    if dtype.itemsize == 2:  # bfloat16: numpy has no such type; same bits as int16
        return torch.from_numpy(raw.view(np.int16).reshape(shape)).view(dtype)
    return torch.from_numpy(raw).view(dtype).view(shape)


class _Mapped:
    """A client's sealed memfd, mapped into the server (same interface as _Region)."""

    def __init__(self, name: str, field: str):
        m = _MEMFD_NAME.match(name)
        pid, fd, token = m.groups()
        self.name = name
        self.path = f"/proc/{int(pid)}/fd/{int(fd)}"
        try:
            link = os.readlink(self.path)
        except OSError:
            raise _invalid(f"{field}: unknown shared-memory region {name!r} (cannot open {self.path}: is the "
                           "client on this host, in this PID namespace, and the same user?)") from None
        if link != f"/memfd:{PREFIX}{token} (deleted)":
            raise _invalid(f"{field}: unknown shared-memory region {name!r} ({self.path} is not that "
                           "flashserve region)")
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _invalid(f"{field}: unknown shared-memory region {name!r} (cannot open {self.path}: "
                           f"{errno.errorcode.get(exc.errno, exc.errno)})") from None
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not stat.S_ISREG(st.st_mode) or not seals & fcntl.F_SEAL_SHRINK:
                raise _invalid(f"{field}: region {name!r} is not a memfd sealed against shrinking")
            self._size = st.st_size
            self._ident = (st.st_dev, st.st_ino)
            self._mmap = mmap.mmap(fd, self._size) if self._size else None
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._mmap, dtype=np.uint8) if self._mmap else np.empty(0, np.uint8)
        self.address = self._array.ctypes.data
        self._bases = RowViews(self._size, self._make_base)  # typed_view's cached bases
        # Page-locking (ShmTransport's lock guards these): None = not tried, else whether it is pinned. `users`
        # counts calls whose GPU copies may touch the mapping; it is unpinned only when evicted and unused, and
        # always before the mapping can go (the mapping lives as long as this object).
        self.pinned: Optional[bool] = None
        self.users = 0
        self.evicted = False
        self._pinner: Optional[HostPinner] = None

    def _pin_size(self) -> int:
        return -(-self._size // _PAGE) * _PAGE  # the mapping covers whole pages

    def hold_pinned(self, pinner: HostPinner) -> bool:
        """Pin on first use; count one more user. False (no user counted) when it cannot be pinned."""
        if self.pinned is None and not self.evicted:
            self.pinned = pinner.pin(self.address, self._pin_size())
            self._pinner = pinner if self.pinned else None
        if not self.pinned:
            return False
        self.users += 1
        return True

    def let_go(self) -> None:
        self.users -= 1
        self._maybe_unpin()

    def evict(self) -> None:
        self.evicted = True
        self._maybe_unpin()

    def _maybe_unpin(self) -> None:
        if self.evicted and self.users == 0 and self.pinned:
            self._pinner.unpin(self.address, self._pin_size())
            self.pinned = False

    def alive(self) -> bool:
        """Whether the client's descriptor still is this region (closed or reused numbers are not)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def size(self) -> int:
        return self._size

    check = _Region.check

    def read_into(self, dst: torch.Tensor, offset: int, field: str) -> None:
        n = dst.numel()
        if n:
            copy_bytes(dst.view(-1).numpy(), self._array[offset:offset + n])

    _MAX_BASES = MAX_VIEW_BASES

    def typed_view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A tensor of dtype and shape on the mapping itself at offset (no copy), by indexing (flashserve.shm.RowViews):
        the GPU process makes several per request, and a torch view op there could wait for the GIL."""
        shape = tuple(shape)
        nbytes = ITEMSIZE_OF[dtype] * math.prod(shape)
        if offset < 0 or offset + nbytes > self._size:
            raise ValueError(f"typed_view: [{offset}, {offset + nbytes}) lies outside the mapping")
        view = self._bases.view(offset, dtype, shape)
        # (callers check alignment; an unaligned slice is never misread: it goes through numpy)
        return view if view is not None else _as_tensor(self._array[offset:offset + nbytes], dtype, shape)

    def _make_base(self, phase: int, rows: int, dtype: torch.dtype, row_shape: tuple) -> torch.Tensor:
        row = ITEMSIZE_OF[dtype] * math.prod(row_shape)
        return _as_tensor(self._array[phase:phase + rows * row], dtype, (rows, *row_shape))

    def copy_small(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A copy of a small tensor in a plain CPU buffer (one numpy copy; no staging, few torch calls)."""
        return _as_tensor(self._array[offset:offset + ITEMSIZE_OF[dtype] * math.prod(shape)].copy(), dtype, shape)

    def contains_at(self, t: torch.Tensor, offset: int) -> bool:
        """Whether t already lies at offset of this mapping (the GPU copied it there)."""
        return t.numel() > 0 and t.data_ptr() == self.address + offset and t.is_contiguous()

    def write_from(self, src: torch.Tensor, offset: int, field: str) -> None:
        if self.contains_at(src, offset):
            return
        t = src.detach().contiguous().reshape(-1)
        if t.numel():
            nbytes = t.numel() * t.element_size()
            copy_bytes(self._array[offset:offset + nbytes], t.view(torch.uint8).numpy())

    def close(self) -> None:
        pass  # stays mapped in the cache; unmapped when evicted and no copy uses it


class ShmTransport:
    """The service's `shm` hook: read_inputs(header) and write_outputs(request, outputs)."""

    def __init__(self, allocate: Optional[Callable[[int], torch.Tensor]] = None,
                 pinner: Optional[HostPinner] = None):
        self.allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8))
        self.pinner = pinner  # set on CUDA: large tensors then travel between the GPU and the region directly
        self.bytes_read = 0
        self.bytes_written = 0
        self.bytes_direct_in = 0  # of those, copied by the GPU straight from / into a pinned region
        self.bytes_direct_out = 0
        self._mapped: "collections.OrderedDict[str, _Mapped]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def _open(self, name: str, field: str, writable: bool):
        if not _MEMFD_NAME.match(name or ""):
            return _Region(name, field, writable)
        with self._lock:
            region = self._mapped.get(name)
        # A name (its token) never names another memfd, so a cached mapping is that region. Reads need no
        # check (a client that closed its region reads its own stale bytes); a write first checks that the
        # client still has the region, so that its outputs are not written where nobody will read them.
        if region is not None and (not writable or region.alive()):
            with self._lock:
                if name in self._mapped:
                    self._mapped.move_to_end(name)
            return region
        region = _Mapped(name, field)
        with self._lock:
            old = self._mapped.pop(name, None)
            if old is not None:
                old.evict()
            self._mapped[name] = region
            dead = [n for n, r in self._mapped.items() if n != name and not r.alive()]
            for n in dead:  # regions their clients closed (or exited): unmapped once no copy uses them
                self._mapped.pop(n).evict()
            while len(self._mapped) > MAX_MAPPED:
                self._mapped.popitem(last=False)[1].evict()
        return region

    def release(self, holds: List["_Mapped"]) -> None:
        """A call whose GPU copies touched these pinned regions is over (they may be unpinned now)."""
        with self._lock:
            for region in holds:
                region.let_go()
            holds.clear()

    def pinned_bytes(self) -> int:
        with self._lock:
            return self.pinner.pinned_bytes if self.pinner is not None else 0

    def _hold(self, region, holds: List["_Mapped"], held: Optional[List["_Mapped"]] = None) -> bool:
        """Page-lock region (if not yet) and count this call as its user until `release(holds)`."""
        if self.pinner is None or not isinstance(region, _Mapped):
            return False
        with self._lock:
            if not region.hold_pinned(self.pinner):
                return False
        holds.append(region)
        if held is not None:
            held.append(region)
        return True

    def output_placer(self, request: pb.Header, holds: List["_Mapped"]):
        """For a CUDA backend: a function (name, device tensor) -> the slice of the request's output region that
        `write_outputs` will use for it, page-locked, so the device-to-host copy lands there directly; None
        where that is not possible (then it copies through staging, and write_outputs reports any problem)."""
        if self.pinner is None or not is_memfd_name(request.output_region):
            return None
        placed: Dict[str, int] = {}
        state = {"next": request.output_offset, "region": None}

        def place(name: str, t: torch.Tensor) -> Optional[torch.Tensor]:
            nbytes = t.numel() * t.element_size()
            at = placed.get(name)
            if at is None:  # same order and alignment as write_outputs (a retried job asks again: same places)
                at = placed[name] = state["next"]
                state["next"] = (at + nbytes + ALIGN - 1) // ALIGN * ALIGN
            if state["region"] is None:  # (write_outputs checks that the client still has it, once per call)
                region = self._open(request.output_region, "output_region", writable=False)
                if not self._hold(region, holds):
                    return None
                state["region"] = region
            region = state["region"]
            if at % ALIGN or at < 0 or at + nbytes > region.size() or nbytes == 0:
                return None
            return region.typed_view(at, t.dtype, tuple(t.shape))

        return place

    def close(self) -> None:
        """Forget every mapping; pinned ones are unpinned now or, if a call still uses one, when it ends. (A mapping
        must never go while page-locked: a later mapping at the same address could not be registered.)"""
        with self._lock:
            regions, self._mapped = list(self._mapped.values()), collections.OrderedDict()
            for region in regions:
                region.evict()

    def _placed_descs(self, request: pb.Header, outputs: Dict[str, torch.Tensor]) -> List[pb.TensorDesc]:
        descs, at, total = [], request.output_offset, 0
        for name, t in outputs.items():
            d = describe(name, t)
            d.shm.region, d.shm.offset = request.output_region, at
            descs.append(d)
            total += d.nbytes
            at = (at + d.nbytes + ALIGN - 1) // ALIGN * ALIGN
        with self._lock:
            self.bytes_direct_out += total
            self.bytes_written += total
        _SHM_OUT.inc(total)
        return descs

    def _all_placed(self, request: pb.Header, outputs: Dict[str, torch.Tensor]) -> bool:
        with self._lock:
            region = self._mapped.get(request.output_region)
        if region is None:
            return False
        at = request.output_offset
        for t in outputs.values():
            if not region.contains_at(t, at):
                return False
            at = (at + t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN
        return True

    def mapped_regions(self) -> int:
        with self._lock:
            return len(self._mapped)

    def read_inputs(self, header: pb.Header, allocate: Optional[Callable[[int], torch.Tensor]] = None,
                    names: Optional[Set[str]] = None, check_only: bool = False,
                    borrow: Set[str] = frozenset(), holds: Optional[List["_Mapped"]] = None
                    ) -> Dict[str, torch.Tensor]:
        """The shared-memory tensors of a request (those in `names`, default all), copied once into server
        buffers (from `allocate`, default the transport's). check_only: check names, offsets and sizes, copy
        nothing (the copy then checks again: a region may change in between). borrow: names of tensors that, when
        in a sealed memfd region, are returned as views of the client's memory, not copied (for a CPU backend
        that only reads them during the call; never for anything kept past it or validated by value). holds: for a
        CUDA backend, borrow only from regions that could be page-locked, list them here (for `release`), and
        leave out (do not copy) the tensors in `borrow` that cannot be borrowed."""
        allocate = allocate or self.allocate
        # each descriptor's fields read once (protobuf field reads are not free on a GPU server's busiest thread)
        descs = [(d.name, d.shm.region, d.shm.offset, d.nbytes, d.dtype, tuple(d.shape)) for d in header.tensors
                 if d.HasField("shm") and (names is None or d.name in names)]
        regions: Dict[str, _Region] = {}
        out: Dict[str, torch.Tensor] = {}
        try:
            for name, region_name, offset, nbytes, dtype, _ in descs:  # check everything before copying anything
                field = f"{name}.shm"
                r = regions.get(region_name)
                if r is None:
                    r = regions[region_name] = self._open(region_name, field, writable=False)
                r.check(offset, nbytes, ITEMSIZE[dtype], field)
            if check_only:
                return out
            read = direct = 0
            held: List[_Mapped] = []  # regions this call already holds page-locked (one hold per region)
            for name, region_name, offset, nbytes, proto_dtype, shape in descs:
                region = regions[region_name]
                dtype = PROTO_TO_TORCH[proto_dtype]
                if name in borrow and isinstance(region, _Mapped) and nbytes and (
                        holds is None or any(h is region for h in held) or self._hold(region, holds, held)):
                    out[name] = region.typed_view(offset, dtype, shape)
                    if holds is not None:
                        direct += nbytes
                elif holds is not None and name in borrow:
                    continue  # not page-locked: left to the caller (read through staging by the compute worker)
                elif isinstance(region, _Mapped) and nbytes <= SMALL_BYTES:
                    out[name] = region.copy_small(offset, dtype, shape)
                elif nbytes == 0:
                    out[name] = torch.empty(shape, dtype=dtype)
                else:
                    buf = allocate(nbytes)
                    region.read_into(buf, offset, f"{name}.shm")
                    out[name] = buf.view(dtype).view(shape)
                read += nbytes
            with self._lock:
                self.bytes_read += read
                self.bytes_direct_in += direct
            _SHM_IN.inc(read)
        finally:
            for r in regions.values():
                r.close()
        return out

    def write_outputs(self, request: pb.Header, outputs: Dict[str, torch.Tensor]) -> List[pb.TensorDesc]:
        """Write outputs into the request's output region from output_offset on (each slice 64-byte
        aligned); returns their descriptors. Raises INVALID_ARGUMENT when they do not fit."""
        # Outputs the GPU already copied to their places in a cached mapping (output_placer's views, so in
        # bounds and aligned) need no liveness check (a stat of /proc/PID/fd/N, there so that nothing is written
        # where nobody reads it), no bounds check and no write: only their descriptors.
        if self._all_placed(request, outputs):
            return self._placed_descs(request, outputs)
        region = self._open(request.output_region, "output_region", writable=True)
        try:
            offset = request.output_offset
            if offset < 0 or offset % ALIGN:
                raise _invalid(f"output_offset: {offset} must be a non-negative multiple of {ALIGN}")
            plan = []
            pos = end = offset
            for name, t in outputs.items():
                nbytes = t.numel() * t.element_size()
                plan.append((name, t, pos))
                end = pos + nbytes
                pos = (end + ALIGN - 1) // ALIGN * ALIGN
            region.check(offset, end - offset, 1, "output_region")
            descs = []
            for name, t, at in plan:
                if isinstance(region, _Mapped) and region.contains_at(t, at):
                    with self._lock:
                        self.bytes_direct_out += t.numel() * t.element_size()
                region.write_from(t, at, f"output_region ({name})")
                d = describe(name, t)
                d.shm.region, d.shm.offset = request.output_region, at
                descs.append(d)
                with self._lock:
                    self.bytes_written += d.nbytes
                _SHM_OUT.inc(d.nbytes)
            return descs
        finally:
            region.close()
