"""server/chunks.py: the receive side's chunk copies and the send side's encoding ahead, off the event loop."""
import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.server.chunks import ChunkCopier, encode_ahead


def test_copies_land_in_place_and_the_loop_waits_only_for_its_bound():
    src = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8)
    dst = np.zeros(src.numel(), np.uint8)
    copier = ChunkCopier(threads=2)

    async def main():
        copies = copier.call(asyncio.get_running_loop())
        chunk = 100_000
        for pos in range(0, src.numel(), chunk):
            data = src[pos:pos + chunk].numpy().tobytes()
            copies.submit([(dst, pos, 0, len(data))], data)
            if copies.pending > 3:
                await copies.wait(3)
                assert copies.pending <= 3
        await copies.drain()
        assert copies.pending == 0 and copies.error is None

    asyncio.run(main())
    copier.close()
    assert np.array_equal(dst, src.numpy())


def test_a_failed_copy_is_reported_to_its_call_alone():
    copier = ChunkCopier(threads=1)
    dst = np.zeros(10, np.uint8)

    async def main():
        loop = asyncio.get_running_loop()
        bad, good = copier.call(loop), copier.call(loop)
        bad.submit([(dst, 0, 0, 5)], b"ab")  # source shorter than the piece: numpy refuses
        good.submit([(dst, 5, 0, 2)], b"xy")
        with pytest.raises(ValueError):
            await bad.wait(0)
        await good.wait(0)
        assert good.error is None and bytes(dst[5:7]) == b"xy"

    asyncio.run(main())
    copier.close()


def test_drain_outlives_a_cancel_until_the_copies_are_done():
    gate = threading.Event()
    copier = ChunkCopier(threads=1)
    finished = []

    class SlowArray(np.ndarray):
        def __setitem__(self, key, value):
            gate.wait(5)
            finished.append(time.monotonic())
            super().__setitem__(key, value)

    dst = np.zeros(4, np.uint8).view(SlowArray)

    async def main():
        copies = copier.call(asyncio.get_running_loop())
        copies.submit([(dst, 0, 0, 4)], b"abcd")
        task = asyncio.ensure_future(copies.drain())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for the copy that writes into the call's buffer
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished and copies.pending == 0

    asyncio.run(main())
    copier.close()


def _frames(n):
    tensors = [torch.randn(n * 256)]
    return list(wire.iter_encoded(pb.Header(tensors=[wire.describe("t", tensors[0])]), tensors, 1024))


def test_encode_ahead_yields_every_frame_in_order_from_a_helper_thread():
    want = _frames(40)
    threads = []

    def produce():
        for f in want:
            threads.append(threading.get_ident())
            yield f

    async def main():
        return [f async for f in encode_ahead(produce())]

    assert asyncio.run(main()) == want
    assert set(threads) != {threading.get_ident()}


def test_encode_ahead_raises_the_encoders_error_and_stops_when_closed():
    def failing():
        yield b"one"
        raise RuntimeError("encode failed")

    async def collect(gen):
        return [f async for f in gen]

    with pytest.raises(RuntimeError, match="encode failed"):
        asyncio.run(collect(encode_ahead(failing())))

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield bytes([i % 256])
            i += 1

    before = set(threading.enumerate())

    async def take_two():
        gen = encode_ahead(endless(), depth=2)
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()
        return got

    assert asyncio.run(take_two()) == [b"\x00", b"\x01"]
    deadline = time.monotonic() + 5
    while any(t.name == "flashserve-encode" for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "the encoder thread kept running after the reply was closed"
        time.sleep(0.01)
    assert len(produced) <= 5
