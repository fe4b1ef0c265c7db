"""server/chunks.py: the receive side's chunk copies, off the event loop."""
import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from flashserve.server.chunks import ChunkCopier


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
