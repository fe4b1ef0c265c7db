"""Same-host shared-memory transport, server side (enabled by --allow-shm).

A client on this host puts its tensors in a POSIX shared-memory region it created (/dev/shm/NAME)
and sends only `ShmSlice{region, offset}` per tensor; it may also name a region (output_region,
output_offset) for the outputs. The server never maps a client's region: it reads with pread into
its own buffer (pinned staging on CUDA) and writes outputs with pwrite, so each byte is copied once
each way, nothing outside [offset, offset + nbytes) of a region is touched, and a client that
shrinks, unlinks or rewrites its region mid-call can make only that call fail (a mapping would turn a
shrunken file into SIGBUS for the whole server).

Checks, each an INVALID_ARGUMENT naming the tensor: region names must start with `flashserve_`
(the client library's prefix), contain no path separator and name an existing regular file in
/dev/shm; offsets must be non-negative, aligned to the element size, and the slice must lie inside
the region's current size."""
from __future__ import annotations

import errno
import os
import re
import stat
from typing import Callable, Dict, List, Optional

import grpc
import torch

from flashserve.proto import attention_pb2 as pb
from flashserve.wire import ITEMSIZE, PROTO_TO_TORCH, describe

from . import metrics
from .validation import RequestError

SHM_DIR = "/dev/shm"
PREFIX = "flashserve_"
_NAME = re.compile(r"^/?flashserve_[A-Za-z0-9_.-]{1,200}$")
ALIGN = 64  # output slices start on 64-byte boundaries


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def region_path(name: str, field: str) -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise _invalid(f"{field}: shared-memory region name {name[:80]!r} is not a flashserve region "
                       f"(expected '{PREFIX}...' without '/')")
    return os.path.join(SHM_DIR, name.lstrip("/"))


class _Region:
    """An open region file; its size is re-read on every access (the client may resize it)."""

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


class ShmTransport:
    """The service's `shm` hook: read_inputs(header) and write_outputs(request, outputs)."""

    def __init__(self, allocate: Optional[Callable[[int], torch.Tensor]] = None):
        self.allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8))
        self.bytes_read = 0
        self.bytes_written = 0

    def read_inputs(self, header: pb.Header) -> Dict[str, torch.Tensor]:
        """The shared-memory tensors of a request, copied once into server buffers."""
        descs = [d for d in header.tensors if d.HasField("shm")]
        regions: Dict[str, _Region] = {}
        out: Dict[str, torch.Tensor] = {}
        try:
            for d in descs:  # check everything before copying anything
                field = f"{d.name}.shm"
                r = regions.get(d.shm.region)
                if r is None:
                    r = regions[d.shm.region] = _Region(d.shm.region, field, writable=False)
                itemsize = ITEMSIZE[d.dtype]
                r.check(d.shm.offset, d.nbytes, itemsize, field)
            for d in descs:
                buf = self.allocate(d.nbytes)
                regions[d.shm.region].read_into(buf, d.shm.offset, f"{d.name}.shm")
                dtype = PROTO_TO_TORCH[d.dtype]
                out[d.name] = buf.view(dtype).view(tuple(d.shape)) if d.nbytes else torch.empty(
                    tuple(d.shape), dtype=dtype)
                self.bytes_read += d.nbytes
                metrics.SHM_BYTES.labels("in").inc(d.nbytes)
        finally:
            for r in regions.values():
                r.close()
        return out

    def write_outputs(self, request: pb.Header, outputs: Dict[str, torch.Tensor]) -> List[pb.TensorDesc]:
        """Write outputs into the request's output region from output_offset on (each slice 64-byte
        aligned); returns their descriptors. Raises INVALID_ARGUMENT when they do not fit."""
        region = _Region(request.output_region, "output_region", writable=True)
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
                region.write_from(t, at, f"output_region ({name})")
                d = describe(name, t)
                d.shm.region, d.shm.offset = request.output_region, at
                descs.append(d)
                self.bytes_written += d.nbytes
                metrics.SHM_BYTES.labels("out").inc(d.nbytes)
            return descs
        finally:
            region.close()
