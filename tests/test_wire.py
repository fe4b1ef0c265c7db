"""The wire format: chunking, the fast chunk codec's byte-identity with protobuf, reassembly."""
import threading
import time

import pytest
import torch

from flashserve import wire
from flashserve.proto import attention_pb2 as pb

TENSORS = [torch.randn(1000, 3), torch.randint(0, 5, (7,), dtype=torch.int32), torch.randn(0),
           torch.randn(333).to(torch.bfloat16), torch.rand(5) > 0.5]


def _header(ts):
    return pb.Header(tensors=[wire.describe(f"t{i}", t) for i, t in enumerate(ts)])


@pytest.mark.parametrize("chunk_bytes", [1, 100, 4096, 1 << 20])
def test_fast_encoding_is_protobufs_encoding(chunk_bytes):
    h = _header(TENSORS)
    slow = [f.SerializeToString() for f in wire.iter_frames(h, TENSORS, chunk_bytes)]
    fast = list(wire.iter_encoded(h, TENSORS, chunk_bytes))
    assert slow == fast
    assert all(len(pb.Frame.FromString(f).chunk) <= chunk_bytes for f in fast[1:])


def test_large_chunks_filled_without_the_gil_match_protobuf():
    """Chunks of >= NOGIL_ENCODE_BYTES are new bytes objects filled by numpy: the same bytes as protobuf's, a chunk
    spanning tensor boundaries included; each call makes a fresh object (two encodings never share memory)."""
    assert wire._NOGIL_ENCODE  # CPython: the fast path is the one in use
    big = [torch.randn(300_000), torch.randint(0, 9, (70_001,), dtype=torch.int32), torch.randn(50_000).half()]
    h = _header(big)
    chunk = wire.NOGIL_ENCODE_BYTES * 2
    slow = [f.SerializeToString() for f in wire.iter_frames(h, big, chunk)]
    fast = list(wire.iter_encoded(h, big, chunk))
    assert slow == fast and len(fast) > 3
    again = list(wire.iter_encoded(h, big, chunk))
    assert again == fast and all(a is not b for a, b in zip(again[1:], fast[1:]))


@pytest.mark.parametrize("chunk_bytes", [7, 4096])
def test_decoded_frames_reassemble_every_tensor(chunk_bytes):
    h = _header(TENSORS)
    frames = [wire.decode_frame(b) for b in wire.iter_encoded(h, TENSORS, chunk_bytes)]
    assert isinstance(frames[1], wire.RawChunk)  # chunk frames are views, not parsed copies
    _, out = wire.read_stream(frames)
    for i, t in enumerate(TENSORS):
        assert out[f"t{i}"].dtype == t.dtype and torch.equal(out[f"t{i}"], t)


def test_read_ahead_pulls_a_large_reply_on_a_helper_thread():
    h = _header(TENSORS)
    encoded = list(wire.iter_encoded(h, TENSORS, 512))
    pulled_on = []
    before = set(threading.enumerate())

    def frames(extra=()):
        for b in [*encoded, *extra]:
            pulled_on.append(threading.get_ident())
            yield wire.decode_frame(b)

    _, out = wire.read_stream(frames(), read_ahead_bytes=1024)  # the stream carries ~4.7 KB: read ahead
    for i, t in enumerate(TENSORS):
        assert torch.equal(out[f"t{i}"], t)
    assert pulled_on[0] == threading.get_ident() and set(pulled_on[1:]) == {pulled_on[-1]} != {pulled_on[0]}
    pulled_on.clear()
    wire.read_stream(frames(), read_ahead_bytes=1 << 20)  # smaller than the threshold: all on this thread
    assert set(pulled_on) == {threading.get_ident()}
    # bad streams fail the same way when read ahead, and the helper stops
    with pytest.raises(wire.WireError, match="more bytes arrived"):
        wire.read_stream(frames(extra=[encoded[1]]), read_ahead_bytes=1024)
    with pytest.raises(wire.WireError, match="second header"):
        wire.read_stream(frames(extra=[encoded[0]]), read_ahead_bytes=1024)
    with pytest.raises(wire.WireError, match="stream ended early"):
        wire.read_stream((wire.decode_frame(b) for b in encoded[:-1]), read_ahead_bytes=1024)
    deadline = time.monotonic() + 5
    while any(t.name == "flashserve-read" for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "a read-ahead helper thread was left running"
        time.sleep(0.01)


def test_decode_falls_back_to_protobuf_for_other_frames():
    frame = wire.decode_frame(pb.Frame(header=pb.Header(chunk_bytes=5)).SerializeToString())
    assert frame.WhichOneof("kind") == "header" and frame.header.chunk_bytes == 5
    big = pb.Frame(chunk=b"x" * 300).SerializeToString()  # two-byte varint length
    assert bytes(wire.decode_frame(big).chunk) == b"x" * 300


def test_assembler_rejects_bad_streams():
    h = _header(TENSORS[:1])
    asm = wire.TensorAssembler()
    with pytest.raises(wire.WireError, match="before the header"):
        asm.add_chunk(b"abc")
    asm.set_header(h)
    with pytest.raises(wire.WireError, match="second header"):
        asm.set_header(h)
    with pytest.raises(wire.WireError, match="stream ended early"):
        asm.finish()
    asm.add_chunk(wire.byte_view(TENSORS[0]).tobytes())
    with pytest.raises(wire.WireError, match="more bytes arrived"):
        asm.add_chunk(b"\x00")


def test_chunks_copied_out_of_order_assemble_the_same_tensors():
    tensors = [torch.randn(1000, 3), torch.arange(7, dtype=torch.int32), torch.randn(5, 2).bfloat16()]
    header = pb.Header(tensors=[wire.describe(f"t{i}", t) for i, t in enumerate(tensors)])
    frames = [pb.Frame.FromString(f) for f in wire.iter_encoded(header, tensors, 1000)][1:]
    asm = wire.TensorAssembler()
    asm.set_header(header)
    placed = [(asm.place(len(f.chunk)), f.chunk) for f in frames]  # claimed in stream order ...
    for pieces, data in reversed(placed):  # ... copied in any order (the server copies on helper threads)
        wire.copy_pieces(pieces, data)
    got = asm.finish()
    assert all(torch.equal(got[f"t{i}"], t) for i, t in enumerate(tensors))
    with pytest.raises(wire.WireError):
        asm.place(1)  # every byte was claimed


def test_ahead_yields_everything_in_order_and_passes_errors_on():
    assert list(wire.ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise RuntimeError("encoder broke")

    with pytest.raises(RuntimeError, match="encoder broke"):
        list(wire.ahead(failing()))


def test_ahead_stops_its_thread_when_dropped():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    gen = wire.ahead(endless(), depth=2)
    assert next(gen) == 0
    (helper,) = [t for t in threading.enumerate() if t not in before and t.name == "flashserve-encode"]
    gen.close()  # gRPC drops the request iterator of a failed call
    helper.join(2)
    assert not helper.is_alive() and len(produced) <= 5


def test_chunk_size_is_a_power_of_two_near_a_sixteenth_of_the_payload_between_1_mb_and_the_limit():
    MB = 1 << 20
    assert wire.chunk_size_for(100, 4 * MB) == MB  # small payloads: one 1 MB chunk at most
    assert wire.chunk_size_for(16 * MB, 4 * MB) == MB
    assert wire.chunk_size_for(32 * MB, 4 * MB) == 2 * MB
    assert wire.chunk_size_for(63 * MB, 4 * MB) == 2 * MB
    assert wire.chunk_size_for(16 * MB + 4096, 4 * MB) == MB
    assert wire.chunk_size_for(64 * MB, 4 * MB) == 4 * MB
    assert wire.chunk_size_for(1024 * MB, 4 * MB) == 4 * MB  # never over the limit
    assert wire.chunk_size_for(1024 * MB, 1000) == 1000  # a limit under 1 MB wins
    assert wire.chunk_size_for(1024 * MB, 0) == wire.DEFAULT_CHUNK_BYTES
    assert wire.chunk_size_for(1024 * MB, 1 << 40) == wire.MAX_CHUNK_BYTES
