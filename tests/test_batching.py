"""The batching scheduler: batched results equal unbatched ones, bad batch-mates fail alone, deadlines hold,
token budget / dropout / batching-off rules, and the same over a real loopback server."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest
import torch

import flashserve
from flashserve.proto import attention_pb2 as pb
from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.backends.base import AttentionParams
from flashserve.server.backends.torch_backend import TorchBackend
from flashserve.server.scheduler import Job, Scheduler, execute
from flashserve.server.validation import RequestError, Shapes

BACKEND = TorchBackend("cpu")


def make_job(gen, seqs_q, seqs_k=None, heads_q=4, heads_k=2, d=32, causal=True, alibi=None, dropout=0.0,
             op="forward", dtype=torch.float32, deadline=None):
    seqs_k = seqs_k or seqs_q
    tq, tk = sum(seqs_q), sum(seqs_k)
    cu_q = torch.tensor([0] + list(torch.tensor(seqs_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(seqs_k).cumsum(0)), dtype=torch.int32)
    t = {"q": torch.randn(tq, heads_q, d, generator=gen).to(dtype),
         "k": torch.randn(tk, heads_k, d, generator=gen).to(dtype),
         "v": torch.randn(tk, heads_k, d, generator=gen).to(dtype), "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    if alibi == "1d":
        t["alibi_slopes"] = torch.rand(heads_q, generator=gen)
    elif alibi == "2d":
        t["alibi_slopes"] = torch.rand(len(seqs_q), heads_q, generator=gen)
    params = AttentionParams(softmax_scale=1 / math.sqrt(d), causal=causal, dropout_p=dropout, seed=7,
                             max_seqlen_q=max(seqs_q), max_seqlen_k=max(seqs_k))
    shapes = Shapes(tq, tk, heads_q, heads_k, d, len(seqs_q), dtype)
    job = Job(op="forward", tensors=t, params=params, shapes=shapes, deadline=deadline)
    if op == "backward":
        res = execute(BACKEND, job)
        t = dict(t, out=res["out"], softmax_lse=res["softmax_lse"], dout=torch.randn(tq, heads_q, d, generator=gen))
        job = Job(op="backward", tensors=t, params=params, shapes=shapes, deadline=deadline)
    return job


def clone(job: Job) -> Job:
    return Job(op=job.op, tensors=dict(job.tensors), params=job.params, shapes=job.shapes,
               return_softmax=job.return_softmax, deadline=job.deadline)


def run_concurrently(scheduler_kwargs, jobs, backend=BACKEND):
    async def main():
        sched = Scheduler(backend, **scheduler_kwargs)
        try:
            res = await asyncio.gather(*(sched.run(j) for j in jobs), return_exceptions=True)
        finally:
            await sched.close()
        return res, sched.stats.snapshot()

    return asyncio.run(main())


MIXED = [[5], [17, 3], [64], [1, 1, 30], [40, 8, 9], [128]]


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("alibi", [None, "mixed"])
def test_batched_equals_unbatched_mixed_sizes(op, alibi):
    gen = torch.Generator().manual_seed(1)
    jobs = []
    for i, seqs in enumerate(MIXED):
        kind = None if alibi is None else ("1d" if i % 2 else "2d")  # (heads,) and (batch, heads) slopes together
        seqs_k = [s + (i % 3) for s in seqs]  # seqlen_k != seqlen_q: bottom-right causal per sequence
        jobs.append(make_job(gen, seqs, seqs_k, alibi=kind, op=op))
    expected = [execute(BACKEND, clone(j)) for j in jobs]
    results, stats = run_concurrently(dict(workers=1, batch_tokens=1 << 20, batch_delay_us=200_000), jobs)
    assert stats["launches"] == 1 and stats["requests"] == len(jobs) and stats["batched_launches"] == 1
    for job, got, want in zip(jobs, results, expected):
        assert not isinstance(got, BaseException), got
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape
            assert torch.equal(got[name], want[name]), name
        assert job.timings["batch_requests"] == len(jobs)
        for stage in ("queue_s", "copy_in_s", "compute_s", "copy_out_s"):
            assert job.timings[stage] >= 0


def test_token_budget_splits_batches():
    gen = torch.Generator().manual_seed(2)
    jobs = [make_job(gen, [50]) for _ in range(6)]  # 100 q+k tokens each
    results, stats = run_concurrently(dict(workers=1, batch_tokens=250, batch_delay_us=100_000), jobs)
    assert not any(isinstance(r, BaseException) for r in results)
    assert stats["launches"] == 3  # two jobs per launch
    assert [j.timings["batch_requests"] for j in jobs] == [2] * 6


def test_batching_off_is_one_request_per_launch():
    gen = torch.Generator().manual_seed(3)
    jobs = [make_job(gen, [20]) for _ in range(5)]
    results, stats = run_concurrently(dict(workers=2, batch_tokens=0, batch_delay_us=100_000), jobs)
    assert not any(isinstance(r, BaseException) for r in results)
    assert stats["launches"] == 5 and stats["batched_launches"] == 0


def test_dropout_and_different_keys_are_not_batched():
    gen = torch.Generator().manual_seed(4)
    jobs = [make_job(gen, [16], dropout=0.2) for _ in range(3)]
    jobs += [make_job(gen, [16], causal=False), make_job(gen, [16], d=64)]
    expected = [execute(BACKEND, clone(j)) for j in jobs]
    results, stats = run_concurrently(dict(workers=1, batch_tokens=1 << 20, batch_delay_us=50_000), jobs)
    assert stats["launches"] == 5 and stats["batched_launches"] == 0
    for got, want in zip(results, expected):
        assert torch.equal(got["out"], want["out"])  # dropout mask unchanged: same sequence indices


class PickyBackend(TorchBackend):
    """Fails any launch containing the value 1234.5 in q (a request that validation cannot catch)."""

    def forward(self, q, *args, **kw):
        if (q == 1234.5).any():
            raise ValueError("poisoned input")
        return super().forward(q, *args, **kw)


def test_bad_batch_mate_fails_alone_in_scheduler():
    gen = torch.Generator().manual_seed(5)
    jobs = [make_job(gen, [8 + i]) for i in range(5)]
    jobs[2].tensors["q"][3, 0, 0] = 1234.5
    expected = [execute(BACKEND, clone(j)) for j in jobs]
    results, stats = run_concurrently(dict(workers=1, batch_tokens=1 << 20, batch_delay_us=200_000), jobs,
                                      backend=PickyBackend("cpu"))
    assert isinstance(results[2], ValueError)
    for i in (0, 1, 3, 4):
        assert torch.equal(results[i]["out"], expected[i]["out"])
    assert stats["retried"] == 5 and stats["launches"] == 6  # the failed batch, then each member alone
    assert stats["requests"] == 4 and stats["batched_launches"] == 0


def test_deadline_never_delayed_by_batching():
    gen = torch.Generator().manual_seed(6)
    urgent = make_job(gen, [8], deadline=time.monotonic() + 0.5)
    relaxed = make_job(gen, [8])

    async def main():
        sched = Scheduler(BACKEND, workers=1, batch_tokens=1 << 20, batch_delay_us=3_000_000)  # 3 s delay
        t0 = time.monotonic()
        await sched.run(urgent)
        t_urgent = time.monotonic() - t0
        t0 = time.monotonic()
        relaxed.deadline = time.monotonic() + 1.0
        await sched.run(relaxed)
        t_relaxed = time.monotonic() - t0
        await sched.close()
        return t_urgent, t_relaxed

    t_urgent, t_relaxed = asyncio.run(main())
    assert t_urgent < 0.4 and t_relaxed < 0.9  # launched before its deadline, not after the 3 s delay


def test_expired_job_is_not_computed():
    gen = torch.Generator().manual_seed(7)
    slow = make_job(gen, [1024], heads_q=16, heads_k=16, d=128, causal=False)
    late = make_job(gen, [8], deadline=time.monotonic() + 0.05)

    async def main():
        sched = Scheduler(BACKEND, workers=1, batch_tokens=0)
        a = asyncio.ensure_future(sched.run(slow))
        await asyncio.sleep(0.01)
        b = asyncio.ensure_future(sched.run(late))
        res = await asyncio.gather(a, b, return_exceptions=True)
        await sched.close()
        return res, sched.stats.snapshot()

    (res_slow, res_late), stats = asyncio.run(main())
    assert isinstance(res_late, RequestError) and res_late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "out" in res_slow and stats["requests"] == 1


# ---- over a real loopback server ------------------------------------------------------------------
def _forward(target, q, k, v, cu_q, cu_k, timeout=60):
    with flashserve.Client(target, timeout=timeout, transport="bytes") as c:
        params = pb.AttentionParams(causal=True, max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()),
                                    max_seqlen_k=int((cu_k[1:] - cu_k[:-1]).max()))
        reply, outs = c.forward(q, k, v, cu_q, cu_k, params)
        return reply, outs


def _concurrent(fn, n):
    results, errors = [None] * n, [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - examined by the test
            errors[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors


@pytest.fixture(scope="module")
def batching_server():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", batch_tokens=1 << 16, batch_delay_us=300_000,
                       workers=1)
    with BackgroundServer(cfg, backend=PickyBackend("cpu")) as srv:
        yield srv


def _inputs(i):
    gen = torch.Generator().manual_seed(100 + i)
    seqs = MIXED[i % len(MIXED)]
    cu = torch.tensor([0] + list(torch.tensor(seqs).cumsum(0)), dtype=torch.int32)
    n = int(cu[-1])
    return (torch.randn(n, 4, 32, generator=gen), torch.randn(n, 2, 32, generator=gen),
            torch.randn(n, 2, 32, generator=gen), cu, cu)


def test_server_batches_concurrent_requests_and_results_match(batching_server):
    n = 6
    expected = []
    for i in range(n):
        q, k, v, cu_q, cu_k = _inputs(i)
        params = AttentionParams(softmax_scale=32 ** -0.5, causal=True, max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()),
                                 max_seqlen_k=int((cu_k[1:] - cu_k[:-1]).max()))
        shapes = Shapes(q.shape[0], k.shape[0], 4, 2, 32, len(cu_q) - 1, torch.float32)
        expected.append(execute(BACKEND, Job("forward", dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                                             params, shapes)))
    before = batching_server.service.scheduler.stats.snapshot()
    results, errors = _concurrent(lambda i: _forward(batching_server.target, *_inputs(i)), n)
    assert not any(errors), errors
    after = batching_server.service.scheduler.stats.snapshot()
    assert after["requests"] - before["requests"] == n
    assert after["launches"] - before["launches"] < n  # at least one launch served several requests
    assert max(reply.timings.batch_requests for reply, _ in results) > 1
    for (reply, outs), want in zip(results, expected):
        assert torch.equal(outs["out"], want["out"]) and torch.equal(outs["softmax_lse"], want["softmax_lse"])


def test_server_bad_batch_mates_fail_alone(batching_server):
    n = 6

    def call(i):
        q, k, v, cu_q, cu_k = _inputs(i)
        if i == 1:
            q[0, 0, 0] = 1234.5  # passes validation, breaks the backend: INTERNAL for this call only
        if i == 4:
            cu_q = cu_q.clone()
            cu_q[-1] += 1  # caught by validation: INVALID_ARGUMENT before the scheduler
        return _forward(batching_server.target, q, k, v, cu_q, cu_k)

    scheduler = batching_server.service.scheduler
    before = scheduler.stats.snapshot()
    # Without the no-delay shortcut (launch at once when every request in flight is queued), the poisoned request
    # waits for batch-mates even when it reaches the server first: it is certain to share a launch.
    upstream, scheduler.upstream = scheduler.upstream, None
    try:
        results, errors = _concurrent(call, n)
    finally:
        scheduler.upstream = upstream
    assert isinstance(errors[1], flashserve.RemoteError) and errors[1].code == grpc.StatusCode.INTERNAL
    assert isinstance(errors[4], flashserve.RemoteError) and errors[4].code == grpc.StatusCode.INVALID_ARGUMENT
    for i in (0, 2, 3, 5):
        assert errors[i] is None and results[i][1]["out"].shape == _inputs(i)[0].shape
    assert scheduler.stats.snapshot()["retried"] > before["retried"]


def test_server_deadline_shorter_than_batch_delay(batching_server):
    q, k, v, cu_q, cu_k = _inputs(0)
    t0 = time.monotonic()
    reply, outs = _forward(batching_server.target, q, k, v, cu_q, cu_k, timeout=0.25)  # delay is 0.3 s
    assert time.monotonic() - t0 < 0.25 and outs["out"].shape == q.shape


def test_no_delay_when_no_one_else_is_sending():
    gen = torch.Generator().manual_seed(8)
    job = make_job(gen, [8])

    async def main():
        sched = Scheduler(BACKEND, workers=1, batch_tokens=1 << 20, batch_delay_us=3_000_000)
        sched.upstream = lambda: 1  # the server handles this request alone
        t0 = time.monotonic()
        await sched.run(job)
        await sched.close()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0 and job.timings["queue_s"] < 0.5


def test_prepare_and_finish_run_on_the_worker_and_a_failing_one_fails_alone():
    """Job.prepare / Job.finish (shared-memory reads and writes) run around the launch on the compute
    worker; the member whose prepare or finish raises fails alone, the others share one launch."""
    gen = torch.Generator().manual_seed(5)
    jobs = [make_job(gen, [16 + i]) for i in range(4)]
    want = [execute(BACKEND, clone(j)) for j in jobs]
    main = threading.get_ident()
    seen = []
    for i, j in enumerate(jobs):
        held = j.tensors.pop("q")

        def prepare(j=j, held=held, i=i):
            seen.append(threading.get_ident())
            if i == 1:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "q.shm: region gone")
            j.tensors["q"] = held

        def finish(outputs, i=i):
            seen.append(threading.get_ident())
            if i == 2:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "output_region: region gone")

        j.prepare, j.finish = prepare, finish
    results, stats = run_concurrently(dict(workers=1, batch_tokens=1 << 20, batch_delay_us=200_000), jobs)
    assert isinstance(results[1], RequestError) and "q.shm" in results[1].message
    assert isinstance(results[2], RequestError) and "output_region" in results[2].message
    for i in (0, 3):
        assert torch.allclose(results[i]["out"], want[i]["out"], atol=1e-6)
    assert stats["launches"] == 1 and stats["requests"] == 3
    assert main not in seen and len(seen) == 4 + 3


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_gathered_device_inputs_equal_the_concatenation(op):
    """The CUDA path's gather (one slice per member tensor, cu_seqlens shifted on the host, one copy call),
    checked on CPU tensors against torch.cat of the pieces."""
    from flashserve.server.scheduler import _copy_all, _device_inputs, _pieces, _split

    gen = torch.Generator().manual_seed(3)
    jobs = [make_job(gen, s, op=op, alibi="1d") for s in MIXED]
    x, dsts, srcs = _device_inputs(jobs, torch.device("cpu"))
    assert len(dsts) == len(srcs) == len(jobs) * (len(jobs[0].tensors) - 3) + 3  # + merged cu_q, cu_k, alibi
    for d in dsts:
        d.fill_(float("nan") if d.is_floating_point() else -1)  # poison: every element must be written
    _copy_all(dsts, srcs)
    want = _pieces(jobs)
    for name, pieces in want.items():
        assert torch.equal(x[name], torch.cat(pieces, dim=1 if name == "softmax_lse" else 0)), name
    assert x["cu_seqlens_q"].dtype == torch.int32 and x["cu_seqlens_q"][-1].item() == sum(map(sum, MIXED))
    # and back: per-member slices of a batched output, views on the device side
    lse = torch.randn(4, int(x["cu_seqlens_q"][-1]))
    parts = _split(jobs, {"softmax_lse": lse}, host=False)
    assert torch.equal(torch.cat([p["softmax_lse"] for p in parts], dim=1), lse)
    assert all(p["softmax_lse"].data_ptr() >= lse.data_ptr() for p in parts)  # views, not copies


def test_single_job_inputs_are_copied_whole():
    from flashserve.server.scheduler import _copy_all, _device_inputs

    job = make_job(torch.Generator().manual_seed(4), [7, 9])
    x, dsts, srcs = _device_inputs([job], torch.device("cpu"))
    assert len(dsts) == len(job.tensors) and all(x[n] is not job.tensors[n] for n in job.tensors)
    _copy_all(dsts, srcs)
    assert all(torch.equal(x[n], job.tensors[n]) for n in job.tensors)
    _copy_all([], [])  # nothing to copy is fine


class _FakeStream:
    """Stands in for a CUDA stream so the CUDA copy path's logic runs on CPU tensors."""

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("placed", [False, True])
def test_cuda_copy_path_logic_on_cpu(monkeypatch, placed):
    """The scheduler's CUDA path (gather, one launch, per-member or whole copy-out) run with CPU tensors and fake
    streams: the same results as the CPU path, copies counted, and members that name their places get their outputs
    written there. (What only a GPU shows, e.g. copies across devices, is in tests/gpu/test_overlap.py.)"""
    import contextlib

    from flashserve.server import scheduler as sched_mod

    monkeypatch.setattr(sched_mod._STREAMS, "get", lambda dev: (_FakeStream(), _FakeStream(), _FakeStream()))
    monkeypatch.setattr(sched_mod.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(sched_mod, "_pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    gen = torch.Generator().manual_seed(6)
    jobs = [make_job(gen, s) for s in MIXED]
    want = [execute(BACKEND, clone(j)) for j in jobs]
    places = {}
    if placed:
        for i, j in enumerate(jobs):
            def dest(name, t, i=i):
                places[(i, name)] = torch.full(tuple(t.shape), float("nan"), dtype=t.dtype)  # poisoned
                return places[(i, name)]
            j.output_dest = dest
    stats = sched_mod.Stats()
    got = sched_mod._execute_cuda(BACKEND, jobs, stats)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["out"], w["out"])
        torch.testing.assert_close(g["softmax_lse"], w["softmax_lse"])
    s = stats.snapshot()
    assert s["launches"] == 1 and s["requests"] == len(jobs)
    assert s["h2d_copies"] == 3 * len(jobs) + 2  # q, k, v per member; merged cu_seqlens_q / _k
    assert s["d2h_copies"] == (2 * len(jobs) if placed else 2)  # per member into its places, else whole
    if placed:
        assert all(got[i][name] is places[(i, name)] for i, name in places)
    single = sched_mod._execute_cuda(BACKEND, [clone(jobs[2])], sched_mod.Stats())[0]
    torch.testing.assert_close(single["out"], want[2]["out"])
