"""The server as a whole: health, reflection, server info, concurrency, big tensors, cancellation,
deadlines, admission limits, TLS, SIGTERM drain and the CLI."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import flashserve
from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.proto import attention_pb2_grpc as pb_grpc
from flashserve.server import BackgroundServer, ServerConfig
from naive import TOL, naive_attention, rel_err
from test_validation import assert_good, good_tensors, header_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_health_answered(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "flashserve.v1.Attention"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "flashserve.v1.Attention" in services and "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol("flashserve.v1.Attention")
        assert desc.package == "flashserve.v1"
        assert {m.name for m in desc.service[0].method} == {"Forward", "Backward", "Call", "GetServerInfo", "Release"}


def test_server_info(client):
    info = client.server_info(refresh=True)
    assert info.backend == "torch" and info.device == "cpu" and info.backward
    assert set(info.dtypes) == {pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32}
    assert info.max_head_dim == 256
    assert {"causal", "window", "softcap", "alibi", "dropout", "gqa"} <= set(info.features)
    assert info.limits.max_tokens > 0 and info.limits.max_concurrent_requests > 0


def test_sixteen_concurrent_clients(server):
    errors, results = [], {}

    def worker(i):
        try:
            g = torch.Generator().manual_seed(i)
            n = 16 + 7 * i
            q = torch.randn(1, n, 4, 32, generator=g)
            k = torch.randn(1, n + 3, 2, 32, generator=g)
            with flashserve.Client(server.target, timeout=120) as c:
                for _ in range(3):
                    out = flashserve.flash_attn_func(q, k, k, causal=True, client=c)
            cu_q = torch.tensor([0, n], dtype=torch.int32)
            cu_k = torch.tensor([0, n + 3], dtype=torch.int32)
            ref, _ = naive_attention(q[0], k[0], k[0], cu_q, cu_k, causal=True)
            results[i] = rel_err(out[0], ref)
        except Exception as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 16 and max(results.values()) < TOL[torch.float32]
    assert wait_for(lambda: server.service.in_flight == 0)


def test_tensor_over_64_mb_travels_both_ways(server):
    # q and out are 72 MiB each; k/v are small so the compute stays cheap
    total_q, heads, dim = 73728, 1, 256
    q = torch.randn(total_q, heads, dim)
    k = torch.randn(16, heads, dim)
    v = torch.randn(16, heads, dim)
    assert q.numel() * 4 > 64 << 20
    cu_q = torch.tensor([0, total_q], dtype=torch.int32)
    cu_k = torch.tensor([0, 16], dtype=torch.int32)
    with flashserve.Client(server.target, timeout=300) as c:
        params = pb.AttentionParams(max_seqlen_q=total_q, max_seqlen_k=16)
        _, outs = c.forward(q, k, v, cu_q, cu_k, params)
        assert c.bytes_sent > 64 << 20 and c.bytes_received > 64 << 20
    ref = torch.softmax((q[:, 0] @ k[:, 0].T) * dim ** -0.5, dim=-1) @ v[:, 0]
    assert rel_err(outs["out"][:, 0], ref) < 1e-5


def test_chunk_sizes_follow_the_payload_both_ways(server, monkeypatch):
    """16 MB goes in 1 MB messages, 72 MB in 4 MB ones, each way; none over the limit."""
    from flashserve.server import service as service_module

    sizes = {"up": [], "down": []}

    def recording(direction, encode):
        def encode_chunk(pieces):
            frame = encode(pieces)
            sizes[direction].append(len(frame))
            return frame
        return encode_chunk

    # the client's chunks go through wire.iter_encoded; a reply of two or more chunks through the service's own loop
    monkeypatch.setattr(wire, "encode_chunk", recording("up", wire.encode_chunk))
    monkeypatch.setattr(service_module, "encode_chunk", recording("down", service_module.encode_chunk))
    MB = 1 << 20
    with flashserve.Client(server.target, timeout=300, transport="bytes") as c:
        for total_q, chunk in ((16 * MB // 1024, MB), (73728, 4 * MB)):  # q of 16 MB / 72 MB (fp32, 1 x 256)
            sizes["up"].clear()
            sizes["down"].clear()
            q = torch.randn(total_q, 1, 256)
            k = v = torch.randn(16, 1, 256)
            cu_q, cu_k = torch.tensor([0, total_q], dtype=torch.int32), torch.tensor([0, 16], dtype=torch.int32)
            c.forward(q, k, v, cu_q, cu_k, pb.AttentionParams(max_seqlen_q=total_q, max_seqlen_k=16))
            for direction in ("up", "down"):
                payloads = [n - 1 - len(wire._varint(n)) for n in sizes[direction]]  # minus tag and length
                assert max(payloads) == chunk, (direction, total_q, payloads[:3])
                # every chunk full but the last (recorded as encoded: the server's copy threads may finish out of order)
                assert sum(p != chunk for p in payloads) <= 1, (direction, total_q, payloads)


def _blocking_frames(header, first_chunk, release: threading.Event):
    yield pb.Frame(header=header)
    yield pb.Frame(chunk=first_chunk)
    release.wait(30)


def test_cancel_mid_stream_frees_the_call(server):
    t = good_tensors()
    h = header_for(t)
    release = threading.Event()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.AttentionStub(ch)
        call = stub.Forward(_blocking_frames(h, b"\x00" * 100, release), timeout=30)
        assert wait_for(lambda: server.service.in_flight == 1)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    release.set()
    assert wait_for(lambda: server.service.in_flight == 0)
    assert_good(server.target)


def test_deadline_exceeded_while_uploading(server):
    t = good_tensors()
    h = header_for(t)
    release = threading.Event()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.AttentionStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Forward(_blocking_frames(h, b"\x00" * 100, release), timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()
    assert wait_for(lambda: server.service.in_flight == 0)
    assert_good(server.target)


def test_client_deadline_on_slow_compute(server):
    q = torch.randn(1, 2048, 16, 128)
    with flashserve.Client(server.target, timeout=0.05) as c:
        with pytest.raises(flashserve.RemoteError) as err:
            flashserve.flash_attn_func(q, q, q, client=c)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: server.service.in_flight == 0, timeout=60)
    assert_good(server.target)


def test_cancelled_uploads_leave_no_memory_behind(server):
    def rss_mb():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    q = torch.randn(40 * 1024 * 1024 // (4 * 128 * 4), 4, 128)  # 40 MB
    h = pb.Header(operation=pb.FORWARD, tensors=[wire.describe("q", q)])
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    for name, t in (("k", q), ("v", q), ("cu_seqlens_q", cu), ("cu_seqlens_k", cu)):
        h.tensors.append(wire.describe(name, t))
    chunk = wire.byte_view(q)[: 4 << 20].tobytes()

    def cancelled_upload():
        release = threading.Event()
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.AttentionStub(ch).Forward(_blocking_frames(h, chunk, release), timeout=30)
            wait_for(lambda: server.service.in_flight == 1)
            call.cancel()
        release.set()
        assert wait_for(lambda: server.service.in_flight == 0)

    cancelled_upload()
    before = rss_mb()
    for _ in range(6):  # 6 x 120 MB of buffers allocated from the headers
        cancelled_upload()
    assert rss_mb() - before < 150


@pytest.fixture(scope="module")
def one_slot_server():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="torch", max_concurrent=1)) as srv:
        yield srv


def test_max_concurrent_requests(one_slot_server):
    t = good_tensors()
    h = header_for(t)
    release = threading.Event()
    with grpc.insecure_channel(one_slot_server.target) as ch:
        stub = pb_grpc.AttentionStub(ch)
        holder = stub.Forward(_blocking_frames(h, b"", release), timeout=30)
        assert wait_for(lambda: one_slot_server.service.in_flight == 1)
        with flashserve.Client(one_slot_server.target) as c:
            with pytest.raises(flashserve.RemoteError) as err:
                flashserve.flash_attn_func(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8),
                                           client=c)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent" in err.value.details
        holder.cancel()
    release.set()
    assert wait_for(lambda: one_slot_server.service.in_flight == 0)
    assert_good(one_slot_server.target)


def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    cfg = ServerConfig(host="localhost", port=0, backend="torch", tls_cert=str(cert), tls_key=str(key))
    with BackgroundServer(cfg) as srv:
        with flashserve.Client(f"localhost:{srv.running.port}", root_certificates=cert.read_bytes()) as c:
            q = torch.randn(1, 5, 2, 16)
            out = flashserve.flash_attn_func(q, q, q, client=c)
            assert out.shape == q.shape
        with flashserve.Client(f"localhost:{srv.running.port}", retries=1, timeout=5) as plain:
            with pytest.raises(flashserve.RemoteError):
                plain.server_info()


# ---- the CLI, as an operator runs it ------------------------------------------------------------
def _start_cli_server(*extra):
    proc = subprocess.Popen([sys.executable, "-m", "flashserve.server.cli", "serve", "--port", "0", "--backend",
                             "torch", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for _ in range(50):  # log lines may come first
        line = proc.stdout.readline()
        seen.append(line)
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if match or not line:
            break
    assert match, "".join(seen)
    return proc, f"{match.group(1)}:{match.group(2)}"


def test_cli_serve_info_and_sigterm_drain():
    proc, target = _start_cli_server("--drain-s", "20")
    try:
        info = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "info", target], capture_output=True,
                              text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert re.search(r"backend\s+torch", info.stdout) and re.search(r"device\s+cpu", info.stdout)
        # a call in flight when SIGTERM arrives still completes
        t = good_tensors()
        h = header_for(t)
        frames = list(wire.iter_frames(h, list(t.values()), 1 << 20))
        release = threading.Event()

        def slow_frames():
            yield frames[0]
            release.wait(10)
            yield from frames[1:]

        with grpc.insecure_channel(target) as ch:
            call = pb_grpc.AttentionStub(ch).Forward(slow_frames(), timeout=30)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            release.set()
            reply, outs = wire.read_stream(call)
            assert outs["out"].shape == t["q"].shape
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_demo_passes():
    run = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "demo", "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS" in run.stdout and "server backend" in run.stdout


def test_stubs_are_current():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_stale_stubs_are_detected(tmp_path):
    proto_root = tmp_path / "proto"
    (proto_root / "flashserve" / "v1").mkdir(parents=True)
    src = open(os.path.join(ROOT, "proto", "flashserve", "v1", "attention.proto")).read()
    (proto_root / "flashserve" / "v1" / "attention.proto").write_text(
        src.replace("message ReleaseResponse {", "message ReleaseResponse {\n  string note = 9;"))
    for name in ("attention_pb2.py", "attention_pb2.pyi", "attention_pb2_grpc.py"):
        (proto_root / "flashserve" / "v1" / name).write_text(
            open(os.path.join(ROOT, "proto", "flashserve", "v1", name)).read())
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_proto.py"), "--check", "--proto-root",
                          str(proto_root)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "stale stubs" in run.stderr


def test_round_robin_client_over_two_servers():
    cfg = dict(host="127.0.0.1", port=0, backend="torch")
    with BackgroundServer(ServerConfig(**cfg)) as a, BackgroundServer(ServerConfig(**cfg)) as b:
        target = f"ipv4:{a.target},{b.target}"
        before = [a.service.requests_served, b.service.requests_served]
        with flashserve.Client(target, load_balancing="round_robin", timeout=60) as c:
            q = torch.randn(1, 6, 2, 16)
            for _ in range(8):
                flashserve.flash_attn_func(q, q, q, client=c)
        served = [a.service.requests_served - before[0], b.service.requests_served - before[1]]
        assert sum(served) == 8 and min(served) >= 2, served


@pytest.fixture(scope="module")
def byte_budget_server():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", max_inflight_bytes=15_000)
    with BackgroundServer(cfg) as srv:
        yield srv


def test_bytes_in_flight_budget(byte_budget_server):
    # one held call takes ~11 KB of the 15 KB budget; a second of the same size must wait its turn
    t = good_tensors()
    h = header_for(t)
    release = threading.Event()
    with grpc.insecure_channel(byte_budget_server.target) as ch:
        holder = pb_grpc.AttentionStub(ch).Forward(_blocking_frames(h, b"", release), timeout=30)
        assert wait_for(lambda: byte_budget_server.service.inflight_bytes > 0)
        held = byte_budget_server.service.inflight_bytes
        assert held == sum(d.nbytes for d in h.tensors)
        frames = list(wire.iter_frames(h, list(t.values()), 1 << 20))
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.AttentionStub(ch).Forward(iter(frames), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-inflight-bytes" in err.value.details()
        holder.cancel()
    release.set()
    assert wait_for(lambda: byte_budget_server.service.inflight_bytes == 0)
    assert_good(byte_budget_server.target)
