"""`flashserve serve --frontends N`: gRPC front-end processes hand validated requests to one GPU process (the engine,
server/engine.py). Against a real engine with two front ends: results match a float64 reference on both transports,
forward and backward; kept residuals live in the engine (Release and eviction recovery pass through); bad input fails
alone with the same statuses; one engine batches the clients of every front end; a dead front end is replaced, a
dead engine takes its front ends with it, and SIGTERM stops everything cleanly."""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import torch

import flashserve
from flashserve.proto import attention_pb2 as pb
from naive import rel_err
from test_processes import Supervised, alive, children, free_port_block


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$" if labels else rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


@pytest.fixture(scope="module")
def engine():
    port = free_port_block(4)  # the service's port, then the metrics ports
    sup = Supervised("--frontends", "2", "--backend", "torch", "--device", "cpu", "--allow-shm", "--port", str(port),
                     "--metrics-port", str(port + 1), "--drain-s", "2", "--batch-delay-us", "20000")
    sup.metrics = port + 1  # engine: this port, front end i: + 1 + i
    try:
        sup.wait_listening(2)
        yield sup
    finally:
        sup.stop()


def reference(q, k, v, cu, causal=True):
    """float64 varlen attention with GQA, and its leaves (for gradients)."""
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    outs = []
    for b in range(len(cu) - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q2, k2.repeat_interleave(rep, 1), v2.repeat_interleave(rep, 1)))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).transpose(0, 1))
    return torch.cat(outs), (q2, k2, v2)


def varlen_inputs(seed: int, lengths=(1, 17, 128, 40)):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(n, 4, 32, generator=g).requires_grad_()
    k, v = (torch.randn(n, 2, 32, generator=g).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("transport", ["bytes", "shm"])
def test_forward_and_backward_match_the_reference(engine, transport):
    q, k, v, cu, mx = varlen_inputs(1)
    with flashserve.Client(engine.target, timeout=60, transport=transport) as c:
        out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, client=c)
        out.sum().backward()  # backward on the residuals the engine kept
    ref, leaves = reference(q, k, v, cu)
    ref.sum().backward()
    assert rel_err(out.double(), ref) < 1e-5
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_err(got.double(), want.grad) < 1e-5


def test_residuals_live_in_the_engine(engine):
    q, k, v, cu, mx = varlen_inputs(2)
    with flashserve.Client(engine.target, timeout=60, transport="bytes") as c:
        assert c.server_info().residuals
        kept = metric(engine.metrics, "flashserve_residual_bytes")
        out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, client=c)
        assert metric(engine.metrics, "flashserve_residual_bytes") > kept
        assert c.release([out.grad_fn.handle]) == 1  # as after an eviction: backward must resend the tensors
        sent = c.bytes_sent
        out.sum().backward()
        assert c.bytes_sent - sent > 4 * out.numel() * 4
    ref, leaves = reference(q, k, v, cu)
    ref.sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_err(got.double(), want.grad) < 1e-5
    refused = sum(metric(engine.metrics + 1 + i, "flashserve_requests_total",
                         '{code="FAILED_PRECONDITION",method="Backward"}') for i in range(2))
    assert refused >= 1  # the engine refused the released handle, the client resent


def test_bad_input_fails_alone(engine):
    q, k, v, cu, mx = varlen_inputs(3)
    with flashserve.Client(engine.target, timeout=60, transport="bytes") as c:
        bad = cu.clone()
        bad[0] = 1
        with pytest.raises(flashserve.RemoteError) as err:  # found by the front end's validation
            c.forward(q.detach(), k.detach(), v.detach(), bad, cu, call_params(mx))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cu_seqlens_q" in str(err.value)
        with pytest.raises(flashserve.RemoteError) as err:  # found by the engine: a handle it does not hold
            c.backward(torch.randn_like(q), call_params(mx), residual_handle="no-such-handle")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, client=c)
    assert rel_err(out.double(), reference(q, k, v, cu)[0]) < 1e-5


def call_params(mx: int) -> pb.AttentionParams:
    return pb.AttentionParams(softmax_scale=32 ** -0.5, causal=True, max_seqlen_q=mx, max_seqlen_k=mx)


def test_one_engine_batches_the_clients_of_every_front_end(engine):
    launches = metric(engine.metrics, "flashserve_kernel_launches_total")
    served = [metric(engine.metrics + 1 + i, "flashserve_requests_total", '{code="OK",method="Forward"}')
              for i in range(2)]

    start = threading.Barrier(16)

    def one(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(3))
        with flashserve.Client(engine.target, timeout=60, transport="shm") as c:
            c.server_info()  # connected first: the 16 requests then arrive together
            start.wait(30)
            out = flashserve.flash_attn_func(q, k, v, client=c)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return rel_err(out.double(), ref)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        errors = list(pool.map(one, range(16)))
    assert max(errors) < 1e-5
    after = [metric(engine.metrics + 1 + i, "flashserve_requests_total", '{code="OK",method="Forward"}')
             for i in range(2)]
    assert all(a > b for a, b in zip(after, served))  # both front ends served (16 connections: 2 x 2^-16 to fail)
    used = metric(engine.metrics, "flashserve_kernel_launches_total") - launches
    assert used < 16  # some launches were shared


def test_a_dead_front_end_is_replaced_and_sigterm_stops_all():
    sup = Supervised("--frontends", "2", "--backend", "torch", "--device", "cpu", "--drain-s", "2")
    try:
        target = sup.wait_listening(2)
        first = children(sup.proc.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        sup.wait_replaced(first[0], 2)
        for seed in range(4):
            q, k, v, cu, mx = varlen_inputs(10 + seed, lengths=(5, 30))
            with flashserve.Client(target, timeout=60) as c:
                out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, client=c)
            assert rel_err(out.double(), reference(q, k, v, cu)[0]) < 1e-5
    finally:
        pids = children(sup.proc.pid)
        sup.stop()
    assert sup.proc.returncode == 0
    assert not any(alive(p) for p in pids)


def test_front_ends_stop_when_the_engine_dies():
    sup = Supervised("--frontends", "2", "--backend", "torch", "--device", "cpu", "--drain-s", "1")
    try:
        sup.wait_listening(2)
        pids = children(sup.proc.pid)
        sup.proc.kill()  # no SIGTERM, no drain: the engine's socket just closes
        sup.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(alive(p) for p in pids)
    finally:
        sup.stop()


def test_frontends_and_processes_exclude_each_other():
    r = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "serve", "--frontends", "2", "--processes",
                        "2", "--backend", "torch", "--device", "cpu"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "exclude each other" in r.stderr


def test_the_engine_waits_for_batch_mates_still_in_the_front_ends():
    """The scheduler launches without its delay only when every request the front ends hold has reached it."""
    from types import SimpleNamespace

    from flashserve.server.engine import Engine

    scheduler = SimpleNamespace(upstream=None)
    engine = Engine(SimpleNamespace(scheduler=scheduler))
    engine.reported(1, 3)  # front end 1: three requests in flight
    engine.reported(2, 1)
    assert scheduler.upstream() == 4
    engine.answered(1)
    assert scheduler.upstream() == 3
    engine.answered(2)
    engine.answered(2)  # never below zero
    assert scheduler.upstream() == 2
    engine.reported(2, 5)  # the latest report wins
    assert scheduler.upstream() == 7


def test_the_engine_holds_the_limits_of_all_front_ends_together():
    """--max-concurrent and --max-inflight-bytes bound the whole server, not each front end."""
    import asyncio
    from types import SimpleNamespace

    from flashserve.server.config import ServerConfig
    from flashserve.server.engine import Engine
    from flashserve.server.service import AttentionService
    from flashserve.server.validation import RequestError

    service = SimpleNamespace(scheduler=SimpleNamespace(upstream=None), in_flight=2,
                              config=ServerConfig(max_concurrent=2))
    with pytest.raises(RequestError) as err:
        asyncio.run(Engine(service)._run({}))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "all front ends" in err.value.message
    service = SimpleNamespace(config=ServerConfig(max_inflight_bytes=100), inflight_bytes=60)
    admitted = [0]
    with pytest.raises(RequestError) as err:
        AttentionService.admit(service, 50, admitted)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and admitted == [0]
    AttentionService.admit(service, 40, admitted)
    assert admitted == [40] and service.inflight_bytes == 100


def test_engine_pipeline_tool_serves_both_settings(tmp_path):
    """bench/engine_pipeline.py (the GPU process of --frontends N driven over its socket, CUDA calls stubbed) keeps
    working as the engine and scheduler change: it patches the scheduler's CUDA path, so a rename there must fail
    here, not on the next GPU host. Batching off launches once per request, batching on batches, nothing fails."""
    import json
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "bench" / "engine_pipeline.py"
    out = tmp_path / "pipeline.json"
    proc = subprocess.run([sys.executable, str(tool), "--clients", "8", "--connections", "2", "--seconds", "0.5",
                           "--warmup", "0.3", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    on, off = res["batching on"], res["batching off"]
    assert on["requests"] > 0 and off["requests"] > 0
    assert on["errors"] == 0 and off["errors"] == 0
    assert off["launches_per_request"] == 1.0
    assert on["launches_per_request"] < 0.9  # 8 requests in flight, compute stubbed: batches form
    assert on["engine_cpu_ms_per_request"] > 0


def test_engine_messages_carry_tensors_shapes_and_params_unchanged():
    """What a front end hands the engine by value round-trips exactly: small tensors of any layout (copied as bytes
    when contiguous on the CPU, through torch otherwise) and the shapes and parameters as plain tuples."""
    import dataclasses

    from flashserve.server.backends.base import AttentionParams
    from flashserve.server.engine import _values, tensor_from_wire, tensor_to_wire
    from flashserve.server.validation import Shapes

    for t in (torch.tensor([0, 5, 9], dtype=torch.int32), torch.randn(3, 4)[1:], torch.randn(4, 3).t(),
              torch.empty(0, dtype=torch.int32), torch.randn(2, 3).bfloat16(), torch.randn(5, dtype=torch.float64)):
        back = tensor_from_wire(tensor_to_wire(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    shapes = Shapes(1, 2, 3, 4, 5, 6, torch.bfloat16)
    params = AttentionParams(0.5, True, 3, 0, 1.5, 0.1, 7, 8, True, 9, 10)
    assert _values(shapes) == dataclasses.astuple(shapes)
    assert AttentionParams(*_values(params)) == params
