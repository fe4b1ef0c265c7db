"""Scheduler on CUDA: pinned staging, one host-to-device and one device-to-host copy per tensor (counted),
H2D / compute / D2H on separate streams with one batch's copies overlapping another's compute (seen in a
profiler trace), batched results equal to unbatched ones, and the same through a real server.

Needs only torch (CUDA) and flashserve; uses the `torch` backend on CUDA so it does not depend on the kernels."""
from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest
import torch

import flashserve
from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.backends.base import AttentionParams
from flashserve.server.backends.torch_backend import TorchBackend
from flashserve.server.scheduler import Job, Scheduler, execute_batch
from flashserve.server.validation import Shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def job(seqs, heads=4, d=64, dtype=torch.bfloat16, pin=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(seqs)
    cu = torch.tensor([0] + torch.tensor(seqs).cumsum(0).tolist(), dtype=torch.int32)
    t = {"q": torch.randn(n, heads, d, generator=g).to(dtype), "k": torch.randn(n, heads, d, generator=g).to(dtype),
         "v": torch.randn(n, heads, d, generator=g).to(dtype), "cu_seqlens_q": cu, "cu_seqlens_k": cu.clone()}
    if pin:
        t = {k: v.pin_memory() for k, v in t.items()}
    return Job("forward", t, AttentionParams(softmax_scale=1 / math.sqrt(d), causal=True, max_seqlen_q=max(seqs),
                                             max_seqlen_k=max(seqs)), Shapes(n, n, heads, heads, d, len(seqs), dtype))


def test_pinned_staging_from_the_assembler():
    sched = Scheduler(TorchBackend("cuda"), workers=2, batch_tokens=4096, batch_delay_us=100)
    assert sched.allocate is not None
    q = torch.randn(100, 2, 64)
    h = pb.Header(tensors=[wire.describe("q", q)])
    asm = wire.TensorAssembler(sched.allocate)
    asm.set_header(h)
    for f in list(wire.iter_frames(h, [q], 1000))[1:]:
        asm.add_chunk(f.chunk)
    got = asm.finish()["q"]
    assert got.is_pinned() and torch.equal(got, q)


def test_one_copy_each_way_and_batched_equals_unbatched():
    backend = TorchBackend("cuda")
    jobs = [job([64 * (i + 1), 17], seed=i) for i in range(4)]
    singles = [execute_batch(backend, [Job(j.op, dict(j.tensors), j.params, j.shapes)])[0] for j in jobs]
    sched = Scheduler(backend, workers=2, batch_tokens=1 << 20, batch_delay_us=200_000)

    async def main():
        res = await asyncio.gather(*(sched.run(j) for j in jobs))
        await sched.close()
        return res

    results = asyncio.run(main())
    s = sched.stats.snapshot()
    assert s["launches"] == 1 and s["requests"] == 4
    # each member's q, k, v crossed the bus once, straight into its slice; cu_seqlens are merged on the host
    assert s["h2d_copies"] == 4 * 3 + 2
    assert s["d2h_copies"] == 2  # out and lse, once, into pinned buffers
    assert s["host_copies"] == 0  # no host-side concatenation
    for got, want in zip(results, singles):
        assert got["out"].device.type == "cpu" and got["out"].is_pinned()
        # same per-sequence math; only cuBLAS kernel choice could differ by alignment
        torch.testing.assert_close(got["out"], want["out"])
        torch.testing.assert_close(got["softmax_lse"], want["softmax_lse"])


def test_copies_overlap_compute_on_separate_streams(tmp_path):
    """Two workers, big pinned inputs: some host-to-device copy runs while another batch's kernels run."""
    from torch.profiler import ProfilerActivity, profile

    backend = TorchBackend("cuda")
    # big enough for copies of several ms; different keys (head dims) so they are not batched together
    jobs = [job([4096] * 4, heads=16, d=128 if i % 2 else 64, seed=i) for i in range(6)]
    sched = Scheduler(backend, workers=2, batch_tokens=0)

    async def main():
        res = await asyncio.gather(*(sched.run(j) for j in jobs))
        await sched.close()
        return res

    asyncio.run(main())  # warm-up (streams, allocator)
    sched = Scheduler(backend, workers=2, batch_tokens=0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        asyncio.run(main())
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]

    def spans(pred):
        return [(e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("stream")) for e in events
                if e.get("ph") == "X" and pred(e)]

    copies = spans(lambda e: e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""))
    kernels = spans(lambda e: e.get("cat") == "kernel")
    assert copies and kernels
    assert len({s for *_, s in copies} | {s for *_, s in kernels}) >= 3, "expected several streams"
    overlapping = [(c, k) for c in copies for k in kernels if c[2] != k[2] and c[0] < k[1] and k[0] < c[1]]
    assert overlapping, "no host-to-device copy overlapped a kernel on another stream"
    assert sched.stats.snapshot()["h2d_copies"] == 6 * 5


def test_server_on_cuda_with_shm_and_chunks():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", device="cuda", allow_shm=True,
                       batch_tokens=1 << 16, batch_delay_us=2000)
    with BackgroundServer(cfg) as srv:
        errors = []

        def worker(i):
            try:
                transport = "shm" if i % 2 else "bytes"
                with flashserve.Client(srv.target, timeout=120, transport=transport) as c:
                    g = torch.Generator().manual_seed(i)
                    q, k, v = (torch.randn(2, 300 + i, 4, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)
                               .requires_grad_(True) for _ in range(3))
                    out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
                    out.float().sum().backward()
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        *(t.detach().float().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
                    assert (out.float() - ref).abs().max().item() < 2e-2
                    assert q.grad is not None and torch.isfinite(q.grad.float()).all()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        s = srv.service.scheduler.stats.snapshot()
        assert s["host_copies"] == 0 and s["h2d_copies"] > 0 and s["d2h_copies"] > 0
        assert s["requests"] == 16  # 8 forwards + 8 backwards


@pytest.mark.parametrize("pin_bytes", [8 << 30, 0])
def test_shm_regions_are_page_locked_for_direct_gpu_copies(pin_bytes):
    """A CUDA server page-locks the client's memfd regions: inputs go to the GPU straight from them and outputs
    straight into them (counted), batched or not; with --shm-pin-bytes 0 everything goes through staging."""
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", device="cuda", allow_shm=True,
                       batch_tokens=1 << 16, batch_delay_us=5000, shm_pin_bytes=pin_bytes)
    with BackgroundServer(cfg) as srv:
        errors = []

        def worker(i):
            try:
                with flashserve.Client(srv.target, timeout=120, transport="shm") as c:
                    g = torch.Generator().manual_seed(i)
                    q, k, v = (torch.randn(1, 700 + 50 * i, 4, 64, generator=g).to(torch.bfloat16) for _ in range(3))
                    for _ in range(2):  # the second call reuses (and finds pinned) the same regions
                        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
                        ref = torch.nn.functional.scaled_dot_product_attention(
                            *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
                        assert (out.float() - ref).abs().max().item() < 2e-2
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        shm = srv.service.shm
        q_bytes = sum((700 + 50 * i) * 4 * 64 * 2 for i in range(6)) * 2
        if pin_bytes:
            assert shm.bytes_direct_in >= 3 * q_bytes  # q, k, v of every call
            assert shm.bytes_direct_out >= q_bytes  # out of every call (lse too)
            assert shm.pinned_bytes() > 0
        else:
            assert shm.bytes_direct_in == 0 and shm.bytes_direct_out == 0 and shm.pinned_bytes() == 0
        stats = srv.service.scheduler.stats.snapshot()
        assert stats["requests"] == 12 and stats["batched_launches"] > 0  # the batched copy-out ran too


def test_client_pins_its_regions_for_cuda_tensors():
    """A client whose tensors live on the GPU page-locks its shared-memory regions (fast copies both ways)."""
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", device="cuda", allow_shm=True)
    with BackgroundServer(cfg) as srv, flashserve.Client(srv.target, timeout=120, transport="shm") as c:
        g = torch.Generator(device="cuda").manual_seed(3)
        q, k, v = (torch.randn(2, 500, 4, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
                   for _ in range(3))
        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
        out.float().sum().backward()
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.detach().float().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
        assert out.is_cuda and q.grad.is_cuda and (out.float() - ref).abs().max().item() < 2e-2
        regions = c._regions.regions()
        assert regions and all(r._pinned for r in regions)
    assert all(r._bytes is None for r in regions)  # closed (and unpinned first)


def test_failed_page_locking_leaves_no_cuda_error_behind():
    """A refused cudaHostRegister must not surface later as the 'last error' of an unrelated kernel launch."""
    from flashserve import cuda_host

    assert cuda_host.available()
    buf = torch.empty(1 << 20, dtype=torch.uint8)
    ptr = buf.data_ptr() // 4096 * 4096 + 4096
    assert cuda_host.register(ptr, 1 << 19)
    try:
        assert not cuda_host.register(ptr, 1 << 19)  # already registered: refused
        x = torch.ones(1024, device="cuda") * 2  # launches a kernel; torch checks cudaGetLastError after it
        torch.cuda.synchronize()
        assert x.sum().item() == 2048
    finally:
        cuda_host.unregister(ptr)
