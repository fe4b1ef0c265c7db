"""The server's receive-buffer pool: reuse only what nobody else holds."""
import torch

from flashserve.server.pool import BufferPool

N = 2 << 20


def test_returned_buffer_is_reused():
    pool = BufferPool()
    lease = pool.lease()
    a = lease.allocate(N)
    ptr = a.data_ptr()
    del a
    lease.release()
    b = pool.lease().allocate(N)
    assert b.data_ptr() == ptr and pool.hits == 1


def test_buffer_still_referenced_is_not_reused():
    pool = BufferPool()
    lease = pool.lease()
    kept = lease.allocate(N).view(torch.float32)[:10]  # e.g. kept residuals, or an output aliasing an input
    lease.release()
    assert pool.refused == 1 and pool.returned == 0
    other = pool.lease().allocate(N)
    assert other.data_ptr() != kept.data_ptr()


def test_small_buffers_and_cap():
    pool = BufferPool(max_bytes=3 << 20)
    lease = pool.lease()
    small = lease.allocate(1000)
    big1, big2 = lease.allocate(N), lease.allocate(N)
    del small, big1, big2
    lease.release()
    assert pool.returned == 2 and pool._idle_bytes <= 3 << 20
