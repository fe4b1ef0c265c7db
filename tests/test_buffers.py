"""The client's result-buffer pool: reuse what the caller dropped, never what it still holds."""
import torch

from flashserve.buffers import RecyclingPool

N = 2 << 20


def test_dropped_result_buffer_is_reused():
    pool = RecyclingPool()
    a = pool.allocate(N).view(torch.float32).view(-1, 4)
    ptr = a.data_ptr()
    del a
    b = pool.allocate(N)
    assert b.data_ptr() == ptr and pool.hits == 1


def test_held_result_is_never_overwritten():
    pool = RecyclingPool()
    kept = pool.allocate(N)[10:20]  # any view keeps the buffer
    kept.fill_(7)
    arr = pool.allocate(N).numpy()  # a numpy array keeps its tensor alive too
    other = pool.allocate(N)
    assert other.data_ptr() != kept.data_ptr() - 10 and other.data_ptr() != arr.ctypes.data
    other.fill_(1)
    assert bool((kept == 7).all()) and pool.hits == 0


def test_small_requests_bypass_and_bounds_hold():
    pool = RecyclingPool(max_idle_bytes=3 << 20, max_tracked_bytes=5 << 20)
    pool.allocate(1000)
    assert pool.tracked_bytes() == 0
    held = [pool.allocate(N) for _ in range(3)]  # the third would pass max_tracked_bytes: untracked
    assert pool.tracked_bytes() == 2 * N
    del held
    for size in (N + 1, N + 2, N + 3):  # idle buffers of other sizes are dropped down to max_idle_bytes
        pool.allocate(size)
    assert pool.tracked_bytes() <= (3 << 20) + N + 3
