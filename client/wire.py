"""The tensor wire format shared by client and server.

A call direction is a stream of `Frame`s: one `Header` (operation, parameters, tensor
descriptors), then the raw little-endian bytes of each described tensor in header order,
concatenated and cut into `chunk` frames of at most `chunk_bytes`. Tensors whose descriptor
names a shared-memory slice travel no chunk bytes. No base64, no per-element encoding: a
tensor's storage is sent as it lies in memory.
"""
from __future__ import annotations

import ctypes
import math
import os
import queue
import sys
import threading
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from flashserve.proto import attention_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 << 20  # the largest chunk a sender uses by default (see chunk_size_for)
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20

if sys.byteorder != "little":  # the wire is little-endian; so is every machine we target
    raise ImportError("flashserve's wire format needs a little-endian host")

TORCH_TO_PROTO = {
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.int32: pb.INT32,
    torch.int64: pb.INT64,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
}
PROTO_TO_TORCH = {v: k for k, v in TORCH_TO_PROTO.items()}
ITEMSIZE = {code: dtype.itemsize for code, dtype in PROTO_TO_TORCH.items()}  # bytes per element, by wire dtype
DTYPE_NAMES = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.FLOAT32: "float32", pb.FLOAT64: "float64",
               pb.INT32: "int32", pb.INT64: "int64", pb.UINT8: "uint8", pb.BOOL: "bool"}


class WireError(ValueError):
    """The stream does not follow the wire format; `field` names what was wrong."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def dtype_name(proto_dtype: int) -> str:
    return DTYPE_NAMES.get(proto_dtype, f"unknown dtype {proto_dtype}")


def describe(name: str, tensor: torch.Tensor) -> pb.TensorDesc:
    if tensor.dtype not in TORCH_TO_PROTO:
        raise WireError(f"tensor '{name}' has dtype {tensor.dtype}, which the wire cannot carry", name)
    return pb.TensorDesc(name=name, dtype=TORCH_TO_PROTO[tensor.dtype], shape=list(tensor.shape),
                         nbytes=tensor.numel() * tensor.element_size())


def expected_nbytes(desc: pb.TensorDesc) -> int:
    if desc.dtype not in PROTO_TO_TORCH:
        raise WireError(f"tensor '{desc.name}': unknown dtype {desc.dtype}", desc.name)
    shape = list(desc.shape)  # one conversion: each access to a protobuf repeated field costs a call
    if shape and min(shape) < 0:
        raise WireError(f"tensor '{desc.name}': negative dimension in shape {shape}", desc.name)
    return math.prod(shape) * ITEMSIZE[desc.dtype]


def host_bytes(tensor: torch.Tensor) -> Optional[memoryview]:
    """The bytes of a non-empty contiguous CPU tensor as a flat memoryview, made with no torch op (torch ops release
    the GIL and wait to take it back, client/shm.py HELD_COPY_BYTES); None for any other tensor. The view does not
    keep the tensor alive: use it while the caller holds the tensor. (dtype.is_complex, not is_conj() / is_neg():
    those ops release the GIL too, and only complex views carry those bits.)"""
    n = tensor.numel() * tensor.element_size()
    if not n or tensor.device.type != "cpu" or tensor.layout != torch.strided or tensor.dtype.is_complex \
            or not tensor.is_contiguous():
        return None
    return memoryview((ctypes.c_ubyte * n).from_address(tensor.data_ptr())).cast("B")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview (CPU, contiguous); no copy when already so."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def chunk_size_for(total_bytes: int, limit: int) -> int:
    """The chunk size for a payload of total_bytes: 16-31 chunks, at least 1 MB, at most limit. Small payloads
    go in small chunks so that the first and last chunk's copies (encode, decode) are short next to the transfer
    (H200, 16 MB forward round trips: 1.06-1.11x raw grpcio with 1 MB chunks, 0.67-0.82x with 4 MB); large ones keep
    limit-sized messages (fewer per-message costs)."""
    limit = max(1, min(int(limit or DEFAULT_CHUNK_BYTES), MAX_CHUNK_BYTES))
    sixteenth = max(1, int(total_bytes) // 16)
    return min(limit, max(MIN_CHUNK_BYTES, 1 << (sixteenth.bit_length() - 1)))  # a power of two: even messages


def chunk_pieces(tensors: Sequence[torch.Tensor], chunk_bytes: int) -> Iterator[List[memoryview]]:
    """The tensors' bytes in order, as lists of memoryview pieces of exactly chunk_bytes (the last
    list may be shorter). Chunks may span tensor boundaries, so small tensors do not each cost a
    message; nothing is copied here."""
    chunk_bytes = max(1, min(int(chunk_bytes or DEFAULT_CHUNK_BYTES), MAX_CHUNK_BYTES))
    pending: List[memoryview] = []
    pending_len = 0
    for tensor in tensors:
        view = byte_view(tensor)
        pos = 0
        while pos < len(view):
            take = min(chunk_bytes - pending_len, len(view) - pos)
            pending.append(view[pos:pos + take])
            pending_len += take
            pos += take
            if pending_len == chunk_bytes:
                yield pending
                pending, pending_len = [], 0
    if pending_len:
        yield pending


def iter_frames(header: pb.Header, tensors: Sequence[torch.Tensor], chunk_bytes: int) -> Iterator[pb.Frame]:
    """Header frame, then the tensors' bytes in order cut into chunk frames of at most chunk_bytes."""
    yield pb.Frame(header=header)
    for pieces in chunk_pieces(tensors, chunk_bytes):
        yield pb.Frame(chunk=b"".join(pieces))


class TensorAssembler:
    """Rebuilds the tensors of one direction of a call from its frames.

    Feed the header, then chunks; `finish()` checks that every byte arrived. Tensors are
    allocated once, from the header, and chunks are copied straight into them. `allocate` may
    be replaced (e.g. by pinned staging buffers) and must return a uint8 CPU tensor."""

    def __init__(self, allocate=None):
        self.header: Optional[pb.Header] = None
        self._allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8))
        self._buffers: List[Tuple[pb.TensorDesc, torch.Tensor, np.ndarray]] = []
        self._index = 0  # tensor currently being filled
        self._filled = 0  # bytes of it filled so far
        self.received_bytes = 0

    def set_header(self, header: pb.Header, skip_shm: bool = True) -> None:
        if self.header is not None:
            raise WireError("a second header arrived in one stream", "header")
        self.header = header
        names = set()
        for desc in header.tensors:
            if not desc.name:
                raise WireError("a tensor descriptor has no name", "tensors")
            if desc.name in names:
                raise WireError(f"tensor '{desc.name}' is described twice", desc.name)
            names.add(desc.name)
            nbytes = expected_nbytes(desc)
            if desc.nbytes != nbytes:
                raise WireError(f"tensor '{desc.name}': header says {desc.nbytes} bytes but shape "
                                f"{list(desc.shape)} of {dtype_name(desc.dtype)} needs {nbytes}", desc.name)
        for desc in header.tensors:
            if skip_shm and desc.HasField("shm"):
                continue
            buf = self._allocate(desc.nbytes)
            self._buffers.append((desc, buf, buf.numpy() if desc.nbytes else np.empty(0, np.uint8)))
        self._skip_empty()

    def expected_bytes(self) -> int:
        return sum(desc.nbytes for desc, _, _ in self._buffers)

    def _skip_empty(self) -> None:
        while self._index < len(self._buffers) and self._filled == self._buffers[self._index][0].nbytes:
            self._index += 1
            self._filled = 0

    def add_chunk(self, data: bytes) -> None:
        copy_pieces(self.place(len(data)), data)

    def place(self, nbytes: int) -> List[Tuple[np.ndarray, int, int, int]]:
        """Claim the next nbytes of the stream: the (destination array, destination offset, source offset,
        length) pieces a chunk of that size fills. The copies themselves (`copy_pieces`) may then run on any
        thread, in any order: each chunk owns its destination bytes."""
        if self.header is None:
            raise WireError("a data chunk arrived before the header", "header")
        pieces = []
        pos = 0
        while pos < nbytes:
            if self._index >= len(self._buffers):
                raise WireError(f"more bytes arrived than the header describes ({self.expected_bytes()} bytes)",
                                "chunk")
            desc, _, dst = self._buffers[self._index]
            take = min(desc.nbytes - self._filled, nbytes - pos)
            pieces.append((dst, self._filled, pos, take))
            self._filled += take
            pos += take
            self._skip_empty()
        self.received_bytes += nbytes
        return pieces

    def complete(self) -> bool:
        return self.header is not None and self._index >= len(self._buffers)

    def finish(self) -> Dict[str, torch.Tensor]:
        """The chunk-carried tensors by name, typed and shaped; raises if bytes are missing."""
        if self.header is None:
            raise WireError("the stream ended before any header arrived", "header")
        if not self.complete():
            desc = self._buffers[self._index][0]
            raise WireError(f"the stream ended early: tensor '{desc.name}' got {self._filled} of {desc.nbytes} "
                            f"bytes ({self.received_bytes} of {self.expected_bytes()} in all)", desc.name)
        return {desc.name: as_tensor(buf, desc) for desc, buf, _ in self._buffers}


def copy_pieces(pieces: Sequence[Tuple[np.ndarray, int, int, int]], data) -> None:
    """Copy a chunk into the places `TensorAssembler.place` gave it (numpy releases the GIL for large copies)."""
    src = np.frombuffer(data, dtype=np.uint8)
    for dst, at, src_pos, n in pieces:
        dst[at:at + n] = src[src_pos:src_pos + n]


def as_tensor(buf: torch.Tensor, desc: pb.TensorDesc) -> torch.Tensor:
    """Reinterpret a uint8 buffer as the tensor its descriptor describes (no copy)."""
    dtype = PROTO_TO_TORCH[desc.dtype]
    if desc.nbytes == 0:
        return torch.empty(tuple(desc.shape), dtype=dtype, device=buf.device)
    return buf.view(dtype).view(tuple(desc.shape))


READ_AHEAD_BYTES = 8 << 20  # replies at least this large are received on a helper thread (read_stream)


def read_stream(frames: Iterable[pb.Frame], allocate=None,
                read_ahead_bytes: int = 0) -> Tuple[pb.Header, Dict[str, torch.Tensor]]:
    """Collect one direction of a call (synchronous iterator of frames).

    With read_ahead_bytes, a stream whose header describes at least that many chunk bytes is pulled from
    `frames` on a helper thread (`ahead`) while this thread copies each chunk into place: a gRPC stream asks
    the transport for its next message only when iterated, so copying between two iterations would leave
    the connection idle for the copy's duration."""
    asm = TensorAssembler(allocate)
    it = iter(frames)
    try:
        while True:
            frame = next(it, _END)  # (a while loop: `it` becomes the read-ahead once the header is in)
            if frame is _END:
                break
            kind = frame.WhichOneof("kind")
            if kind == "header":
                asm.set_header(frame.header)  # (raises on a second header)
                if read_ahead_bytes and asm.expected_bytes() >= read_ahead_bytes:
                    it = ahead(it, depth=4, name="flashserve-read")
            elif kind == "chunk":
                asm.add_chunk(frame.chunk)
            else:
                raise WireError("an empty frame arrived", "frame")
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # stops the helper thread if the stream was left early
    return asm.header, asm.finish()


# ---- fast path: chunk frames encoded and decoded without protobuf copies --------------------------
# A Frame holding only `chunk` is, on the wire, the tag byte 0x12 (field 2, length-delimited), the
# length as a varint, then the bytes. Building that directly from the tensor's memory, and handing the
# receiver a view of the received message instead of a parsed copy, removes two full copies per
# direction. Messages stay byte-identical to protobuf's, so peers using the generated stubs interoperate.
_CHUNK_TAG = 0x12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class RawChunk:
    """A received chunk frame: `.chunk` is a memoryview of the message (no copy); quacks like a Frame."""

    __slots__ = ("chunk",)

    def __init__(self, data):
        self.chunk = data

    def WhichOneof(self, _oneof: str) -> str:  # noqa: N802 - protobuf's name
        return "chunk"


def decode_frame(data: bytes):
    """gRPC deserializer for Frame: a RawChunk for chunk frames, else the parsed pb.Frame."""
    if len(data) > 1 and data[0] == _CHUNK_TAG:
        n = shift = 0
        pos = 1
        while pos < len(data) and pos < 11:
            b = data[pos]
            n |= (b & 0x7F) << shift
            pos += 1
            if not b & 0x80:
                if pos + n == len(data):
                    return RawChunk(memoryview(data)[pos:])
                break
            shift += 7
    return pb.Frame.FromString(data)


def encode_frame(message) -> bytes:
    """gRPC serializer for Frame: pre-encoded bytes pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def iter_encoded(header: pb.Header, tensors: Sequence[torch.Tensor], chunk_bytes: int) -> Iterator[bytes]:
    """Like iter_frames, but yields the serialized frames; each chunk costs one copy of its bytes."""
    yield pb.Frame(header=header).SerializeToString()
    for pieces in chunk_pieces(tensors, chunk_bytes):
        yield encode_chunk(pieces)


# A chunk frame is built as one bytes object whose contents are copied in by numpy, which releases the GIL for
# the copy: gRPC's own message copies (the event loop's, the channel threads') run meanwhile. bytes.join copies
# with the GIL held, so an encoding thread and gRPC took turns instead (a 4 MB join holds the GIL ~0.3-1 ms).
# Measured on the H200 host (bench/wire_phases.py, join vs this, same run): 64 MB uploads 35.9 -> 31.6 ms,
# 256 MB round trips 231 -> 217 ms. The object comes from the C API's PyBytes_FromStringAndSize(NULL, n), which
# returns a new, unshared object whose contents the caller fills before handing it on: the documented way C code
# builds a bytes object. FLASHSERVE_NOGIL_ENCODE=0 goes back to bytes.join (for A/B runs).
_bytes_new = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_new.restype = ctypes.py_object
_bytes_new.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1  # PyBytesObject: the header, then ob_sval (id() is the address)
NOGIL_ENCODE_BYTES = 256 << 10  # smaller chunks are joined: the copy is shorter than the GIL's hand-offs


def _writable_bytes(n: int) -> Tuple[bytes, np.ndarray]:
    """A new bytes object of n >= 2 bytes (contents undefined) and a writable array over its contents. The array
    does not keep the object alive."""
    out = _bytes_new(None, n)
    return out, np.frombuffer((ctypes.c_ubyte * n).from_address(id(out) + _BYTES_DATA_OFFSET), dtype=np.uint8)


def _check_writable_bytes() -> bool:
    """Whether this interpreter lays bytes out as assumed (CPython); else chunks are joined. The interpreter is
    checked first: elsewhere id() need not be an address, and the probe would write to it."""
    if sys.implementation.name != "cpython":
        return False
    try:
        probe, view = _writable_bytes(3)
        view[:] = (7, 8, 9)
        return probe == b"\x07\x08\x09"
    except Exception:  # noqa: BLE001 - any failure: keep the plain join
        return False


_NOGIL_ENCODE = _check_writable_bytes() and os.environ.get("FLASHSERVE_NOGIL_ENCODE", "1") != "0"


def encode_chunk(pieces: Sequence[memoryview]) -> bytes:
    """The chunk frame (tag, length, bytes) of the pieces' bytes, in order."""
    size = sum(len(p) for p in pieces)
    prefix = bytes([_CHUNK_TAG]) + _varint(size)
    if size < NOGIL_ENCODE_BYTES or not _NOGIL_ENCODE:
        return b"".join([prefix, *pieces])
    out, view = _writable_bytes(len(prefix) + size)
    view[:len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    pos = len(prefix)
    for p in pieces:
        view[pos:pos + len(p)] = np.frombuffer(p, dtype=np.uint8)
        pos += len(p)
    return out


# ---- encoding ahead of the sender ------------------------------------------------------------------
# gRPC's senders take the next message only after the previous one was handed to the transport, so a
# chunk's encoding copy would otherwise sit between two sends. Encoding one or two chunks ahead on a
# helper thread (the copy releases the GIL) overlaps it with the transfer.
_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def ahead(items: Iterable, depth: int = 2, name: str = "flashserve-encode") -> Iterator:
    """Yield what `items` yields, produced on a helper thread up to `depth` items ahead. Closing (or
    dropping) the returned generator stops the helper."""
    q: "queue.Queue" = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()


def chunk_count(tensors: Sequence[torch.Tensor], chunk_bytes: int) -> int:
    total = sum(t.numel() * t.element_size() for t in tensors)
    return -(-total // max(1, chunk_bytes))
