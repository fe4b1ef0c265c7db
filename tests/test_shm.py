"""Same-host shared-memory transport: correct forward and backward (TCP loopback and unix socket), automatic
choice, every bad-region case rejected with INVALID_ARGUMENT while the server keeps serving, nothing written
outside a region, and a region vanishing mid-call failing that call alone."""
from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import torch

import flashserve
from flashserve import shm as client_shm
from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.proto import attention_pb2_grpc as pb_grpc
from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.backends.torch_backend import TorchBackend
from flashserve.server import shm as server_shm
from flashserve.server.shm import _Region
from flashserve.server.validation import RequestError
from naive import rel_err


class HookBackend(TorchBackend):
    """Runs `hook` (if set) inside forward: simulates a client that changes its region mid-call."""

    hook = None

    def forward(self, *args, **kw):
        if self.hook is not None:
            self.hook()
        return super().forward(*args, **kw)


BACKEND = HookBackend("cpu")


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("sock") / "fs.sock")
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", allow_shm=True, unix_socket=sock)
    with BackgroundServer(cfg, backend=BACKEND) as srv:
        yield srv


def reference(q, k, v, causal):
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2),
                                                           v2.transpose(1, 2), is_causal=causal).transpose(1, 2)
    return out, (q2, k2, v2)


@pytest.mark.parametrize("via,kind", [("tcp", "memfd"), ("unix", "memfd"), ("tcp", "file")])
def test_forward_backward_over_shm(shm_server, via, kind):
    target = shm_server.target if via == "tcp" else f"unix:{shm_server.config.unix_socket}"
    with flashserve.Client(target, timeout=60) as c:
        assert c.uses_shm()  # auto: allowed, loopback / unix, same host
        c._regions = client_shm.RegionPool(memfd=kind == "memfd")
        read0 = shm_server.service.shm.bytes_read
        g = torch.Generator().manual_seed(0)
        for n in (33, 200):  # two sizes: the region is reused, then grown
            q, k, v = (torch.randn(2, n, 4, 32, generator=g).requires_grad_(True) for _ in range(3))
            out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
            dout = torch.randn(out.shape, generator=g)
            out.backward(dout)
            ref, leaves = reference(q, k, v, True)
            ref.backward(dout)
            assert rel_err(out, ref) < 1e-5
            for got, want in zip((q.grad, k.grad, v.grad), leaves):
                assert rel_err(got, want.grad) < 1e-5
        assert c.bytes_sent == 0 and c.bytes_received == 0  # no tensor byte in a gRPC chunk
        assert c.shm_bytes_sent > 0 and c.shm_bytes_received > 0
        assert shm_server.service.shm.bytes_read - read0 == c.shm_bytes_sent
        names = c._regions.names()
        paths = [r.path for r in c._regions.regions()]
        assert all(n.startswith("flashserve_fd_" if kind == "memfd" else "flashserve_") for n in names)
        assert all(os.path.exists(p) for p in paths)
        if kind == "file":
            assert all(p == os.path.join("/dev/shm", n) for p, n in zip(paths, names))
    assert not any(os.path.exists(p) for p in paths)  # unlinked (file) or closed (memfd) on close


def test_memfd_region_is_sealed_mapped_once_and_forgotten_when_closed(shm_server):
    with flashserve.Client(shm_server.target, timeout=60) as c:
        c._regions = client_shm.RegionPool(memfd=True)
        q = torch.randn(1, 64, 2, 16)
        for _ in range(3):
            flashserve.flash_attn_func(q, q, q, client=c)
        (region,) = c._regions._all  # the input region; outputs have their own
        with pytest.raises(OSError):  # the kernel refuses: the server's mapping can never lose pages
            os.ftruncate(region._fd, 64)
        mapped = shm_server.service.shm._mapped
        assert region.name in mapped and mapped[region.name].alive()
        entry = mapped[region.name]
    assert not entry.alive()  # closed with the client: dropped at the server's next new mapping
    with flashserve.Client(shm_server.target, timeout=60) as c:
        flashserve.flash_attn_func(q, q, q, client=c)
        assert region.name not in shm_server.service.shm._mapped


def test_client_falls_back_to_files_when_server_cannot_open_memfds(shm_server, monkeypatch):
    def refuse(self, name, field):
        raise server_shm._invalid(f"{field}: unknown shared-memory region {name!r} (test)")

    monkeypatch.setattr(server_shm._Mapped, "__init__", refuse)
    with flashserve.Client(shm_server.target, timeout=60) as c:
        c._regions = client_shm.RegionPool(memfd=True)
        q = torch.randn(1, 16, 2, 16)
        out = flashserve.flash_attn_func(q, q, q, client=c)
        assert rel_err(out, reference(q, q, q, False)[0]) < 1e-5
        assert c.uses_shm() and not c._regions.memfd and c.bytes_sent == 0
        assert all(not r.memfd for r in c._regions._all)


def test_backward_without_residuals_over_shm(shm_server):
    with flashserve.Client(shm_server.target, timeout=60, transport="bytes-only") as c:
        c._shm_ok = None
        c.transport = "shm"
        q, k, v = (torch.randn(1, 40, 2, 16).requires_grad_(True) for _ in range(3))
        out = flashserve.flash_attn_func(q, k, v, client=c)
        out.sum().backward()
        ref, leaves = reference(q, k, v, False)
        ref.sum().backward()
        assert rel_err(q.grad, leaves[0].grad) < 1e-5 and c.bytes_sent == 0


def test_auto_transport_choice(shm_server):
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="torch")) as plain:
        with flashserve.Client(plain.target, timeout=30) as c:
            assert not c.server_info().shared_memory and not c.uses_shm()
            q = torch.randn(1, 8, 2, 16)
            flashserve.flash_attn_func(q, q, q, client=c)
            assert c.bytes_sent > 0
    with flashserve.Client(shm_server.target, transport="bytes") as c:
        assert not c.uses_shm()
    assert client_shm.is_local_target("localhost:5") and client_shm.is_local_target("unix:/tmp/x")
    assert client_shm.is_local_target("ipv4:127.0.0.1:1,127.0.0.2:2") and client_shm.is_local_target("[::1]:80")
    assert not client_shm.is_local_target("10.0.0.1:50051") and not client_shm.is_local_target("dns:///svc:50051")


# ---- bad regions ----------------------------------------------------------------------------------
def small_inputs():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(16, 2, 16, generator=g)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    return [("q", q), ("k", q.clone()), ("v", q.clone()), ("cu_seqlens_q", cu), ("cu_seqlens_k", cu.clone())]


def shm_request(region, named=None, offsets=None, output_region=None, output_offset=None):
    """A Forward header with every tensor in `region` (written there), outputs after them."""
    named = named or small_inputs()
    header = pb.Header(operation=pb.FORWARD, params=pb.AttentionParams(max_seqlen_q=16, max_seqlen_k=16))
    pos = 0
    for i, (name, t) in enumerate(named):
        region.put(t, pos)
        d = wire.describe(name, t)
        d.shm.region, d.shm.offset = region.name, pos if offsets is None or i not in offsets else offsets[i]
        header.tensors.append(d)
        pos += client_shm.align(t.numel() * t.element_size())
    header.output_region = region.name if output_region is None else output_region
    header.output_offset = pos if output_offset is None else output_offset
    return header


def call(target, header):
    with grpc.insecure_channel(target) as ch:
        return wire.read_stream(pb_grpc.AttentionStub(ch).Forward(iter([pb.Frame(header=header)]), timeout=30))


def call_unary(target, header):
    """The one-message form (Call): every tensor in shared memory, outputs into output_region."""
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.AttentionStub(ch).Call(header, timeout=30), {}


CALLS = {"stream": call, "Call": call_unary}


def still_serving(target, shm=False):
    for transport in ("bytes", "shm") if shm else ("bytes",):
        with flashserve.Client(target, timeout=30, transport=transport) as c:
            q = torch.randn(1, 8, 2, 16)
            out = flashserve.flash_attn_func(q, q, q, client=c)
            ref, _ = reference(q, q, q, False)
            assert rel_err(out, ref) < 1e-5


@pytest.fixture(params=["memfd", "file"])
def region(request):
    r = client_shm.Region(1 << 20, memfd=request.param == "memfd")
    assert r.size == 1 << 20
    yield r
    r.close()


@pytest.mark.parametrize("rpc", list(CALLS))
def test_good_raw_request_writes_outputs_into_region(shm_server, region, rpc):
    header = shm_request(region)
    reply, outs = CALLS[rpc](shm_server.target, header)
    assert outs == {}  # nothing in chunks
    got = {d.name: region.take(d.shm.offset, wire.PROTO_TO_TORCH[d.dtype], d.shape) for d in reply.tensors}
    q = small_inputs()[0][1]
    ref, _ = reference(q[None], q[None], q[None], False)
    assert rel_err(got["out"], ref[0]) < 1e-5 and got["softmax_lse"].shape == (2, 16)
    assert all(d.shm.offset >= header.output_offset and d.shm.offset % 64 == 0 for d in reply.tensors)


BAD_INPUT_CASES = {
    "unknown region": dict(rename="flashserve_no_such_region_x"),
    "no flashserve prefix": dict(rename="psm_1234"),
    "path traversal": dict(rename="flashserve_../../etc/passwd"),
    "slash in name": dict(rename="flashserve_a/b"),
    "offset past the end": dict(offsets={0: (1 << 20) - 100}),  # the region is 1 MiB
    "offset far past the end": dict(offsets={0: 1 << 40}),
    "negative offset": dict(offsets={1: -64}),
    "misaligned offset": dict(offsets={2: 3}),
    "unknown output region": dict(output_region="flashserve_gone_output"),
    "output region without prefix": dict(output_region="other_region"),
    "outputs do not fit": dict(output_offset=(1 << 20) - 1024),
    "negative output offset": dict(output_offset=-64),
    "output offset past the end": dict(output_offset=1 << 40),
}


@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_bad_region_rejected_and_server_still_serving(shm_server, region, case, rpc):
    spec = BAD_INPUT_CASES[case]
    header = shm_request(region, offsets=spec.get("offsets"), output_region=spec.get("output_region"),
                         output_offset=spec.get("output_offset"))
    if "rename" in spec:
        header.tensors[0].shm.region = spec["rename"]
    before = bytes(region._mmap[:])
    with pytest.raises(grpc.RpcError) as err:
        CALLS[rpc](shm_server.target, header)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "shm" in err.value.details() or "output" in err.value.details() or "region" in err.value.details()
    assert bytes(region._mmap[:]) == before  # nothing written
    still_serving(shm_server.target, shm=True)


def test_symlinked_region_rejected(shm_server, region, tmp_path):
    target_file = tmp_path / "secret"
    target_file.write_bytes(b"x" * 4096)
    link = "/dev/shm/flashserve_test_symlink_%d" % os.getpid()
    os.symlink(target_file, link)
    try:
        header = shm_request(region)
        header.tensors[0].shm.region = os.path.basename(link)
        with pytest.raises(grpc.RpcError) as err:
            call(shm_server.target, header)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        os.unlink(link)
    still_serving(shm_server.target)


def test_shm_refused_when_not_allowed(region):
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="torch")) as plain:
        for rpc in CALLS.values():
            with pytest.raises(grpc.RpcError) as err:
                rpc(plain.target, shm_request(region))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--allow-shm" in err.value.details()
        still_serving(plain.target)


@pytest.mark.parametrize("how", ["unlinked", "shrunk", "memfd closed"])
def test_region_vanishing_mid_call_fails_that_call_alone(shm_server, how):
    region = client_shm.Region(1 << 16, memfd=how == "memfd closed")
    try:
        header = shm_request(region)

        def vanish():
            if how == "unlinked":
                os.unlink(region.path)
            elif how == "shrunk":
                os.truncate(region.path, 64)
            else:
                region.close()

        BACKEND.hook = vanish
        try:
            with pytest.raises(grpc.RpcError) as err:
                call(shm_server.target, header)
        finally:
            BACKEND.hook = None
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        if how == "shrunk":
            assert os.stat(region.path).st_size == 64  # the server did not grow it back
    finally:
        region.close()
    still_serving(shm_server.target)
    with flashserve.Client(shm_server.target, timeout=30) as c:  # and shm calls still work
        q = torch.randn(1, 8, 2, 16)
        flashserve.flash_attn_func(q, q, q, client=c)
        assert c.uses_shm() and c.bytes_sent == 0


def test_region_shrinking_during_read_is_caught():
    region = client_shm.Region(1 << 20, memfd=False)
    r = _Region(region.name, "q.shm", writable=False)
    try:
        r.check(4096, 4096, 4, "q.shm")
        os.truncate(region.path, 5000)
        with pytest.raises(RequestError) as err:
            r.read_into(torch.empty(4096, dtype=torch.uint8), 4096, "q.shm")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        r.close()
        region.close()


def test_memfd_names_checked_before_mapping(shm_server, tmp_path):
    """A flashserve_fd_ name must point at that token's flashserve memfd, sealed against shrinking."""
    import fcntl

    plain = open(tmp_path / "plain", "wb+")
    plain.truncate(1 << 20)
    unsealed = os.memfd_create("flashserve_0123456789ab", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 1 << 20)
    good = client_shm.Region(1 << 20, memfd=True)
    pid = os.getpid()
    try:
        cases = {
            "not a memfd": f"flashserve_fd_{pid}_{plain.fileno()}_0123456789ab",
            "other token": good.name.rsplit("_", 1)[0] + "_ffffffffffff",
            "unsealed memfd": f"flashserve_fd_{pid}_{unsealed}_0123456789ab",
            "no such process": "flashserve_fd_999999999_3_0123456789ab",
        }
        for case, name in cases.items():
            header = shm_request(good)
            header.tensors[0].shm.region = name
            with pytest.raises(grpc.RpcError) as err:
                call(shm_server.target, header)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert name in err.value.details(), case
        assert fcntl.fcntl(unsealed, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK == 0
        reply, _ = call(shm_server.target, shm_request(good))  # and the good region works
        assert {d.name for d in reply.tensors} == {"out", "softmax_lse"}
    finally:
        plain.close()
        os.close(unsealed)
        good.close()
    still_serving(shm_server.target)


def test_results_are_views_of_an_output_region_lent_again_only_once_dropped(shm_server):
    with flashserve.Client(shm_server.target, timeout=60) as c:
        c._regions = client_shm.RegionPool(memfd=True)
        g = torch.Generator().manual_seed(3)
        q1, q2 = torch.randn(1, 64, 2, 16, generator=g), torch.randn(1, 64, 2, 16, generator=g)
        out1 = flashserve.flash_attn_func(q1, q1, q1, client=c)
        out2 = flashserve.flash_attn_func(q2, q2, q2, client=c)  # out1 is held: its region is not lent again
        assert len(c._regions._outputs) == 2
        assert rel_err(out1, reference(q1, q1, q1, False)[0]) < 1e-5  # not overwritten by the second call
        assert rel_err(out2, reference(q2, q2, q2, False)[0]) < 1e-5
        del out1, out2
        out3 = flashserve.flash_attn_func(q1, q1, q1, client=c)
        assert len(c._regions._outputs) == 2 and rel_err(out3, reference(q1, q1, q1, False)[0]) < 1e-5
        assert c.bytes_received == 0


def test_cpu_server_reads_large_inputs_of_sealed_regions_in_place(shm_server):
    pool = shm_server.service.pool
    with flashserve.Client(shm_server.target, timeout=60) as c:
        c._regions = client_shm.RegionPool(memfd=True)
        q = torch.randn(1, 4096, 2, 64)  # 2 MiB per tensor: past the inline size, pooled when copied
        before = (pool.hits, pool.misses)
        out = flashserve.flash_attn_func(q, q, q, client=c)
        assert (pool.hits, pool.misses) == before  # no server buffer: the inputs were read where they lie
        assert rel_err(out, reference(q, q, q, False)[0]) < 1e-5
        c._regions = client_shm.RegionPool(memfd=False)  # a /dev/shm file is never mapped: copied
        out = flashserve.flash_attn_func(q, q, q, client=c)
        assert (pool.hits, pool.misses) != before and rel_err(out, reference(q, q, q, False)[0]) < 1e-5


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_value_checked_tensors_are_copied_before_validation_whatever_their_size(shm_server, monkeypatch, kind):
    """cu_seqlens (and alibi) are validated by value: they are read (copied) before the checks even when
    large; only the other tensors are read later by the compute worker or, on a CPU server, in place."""
    from flashserve.server import service as server_service

    monkeypatch.setattr(server_service, "INLINE_SHM_BYTES", 0)  # every tensor counts as large
    with flashserve.Client(shm_server.target, timeout=60) as c:
        c._regions = client_shm.RegionPool(memfd=kind == "memfd")
        q = torch.randn(2, 40, 2, 16)
        out = flashserve.flash_attn_func(q, q, q, causal=True, client=c)
        assert rel_err(out, reference(q, q, q, True)[0]) < 1e-5
        bad = torch.tensor([0, 50, 80], dtype=torch.int32)  # ends at 80 tokens, q has 80: fine; now break it
        bad[1] = 90
        with pytest.raises(flashserve.RemoteError) as err:
            flashserve.flash_attn_varlen_func(q.reshape(80, 2, 16), q.reshape(80, 2, 16), q.reshape(80, 2, 16),
                                              bad, bad, 50, 50, client=c)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cu_seqlens" in err.value.details


# ---- page-locked regions (CUDA servers): the bookkeeping, with a stand-in for cudaHostRegister -------------
class FakeRegistry:
    """Records cudaHostRegister / cudaHostUnregister calls; `fail` makes registering fail."""

    def __init__(self, fail=False):
        self.live, self.log, self.fail = {}, [], fail

    def register(self, addr, size):
        if self.fail:
            return False
        assert addr % 4096 == 0 and size % 4096 == 0 and addr not in self.live
        self.live[addr] = size
        self.log.append(("pin", addr))
        return True

    def unregister(self, addr, size):
        assert self.live.pop(addr) == size  # only what was pinned, with its size, once
        self.log.append(("unpin", addr))


def pinned_transport(budget=1 << 30, fail=False):
    from flashserve.server.shm import HostPinner, ShmTransport

    reg = FakeRegistry(fail)
    return ShmTransport(pinner=HostPinner(budget, reg.register, reg.unregister)), reg


def test_pinned_inputs_are_borrowed_and_unpinned_only_after_eviction_and_release():
    transport, reg = pinned_transport()
    region = client_shm.Region(1 << 20, memfd=True)
    header = shm_request(region)
    holds = []
    got = transport.read_inputs(header, names={"q", "k"}, borrow={"q", "k"}, holds=holds)
    mapped = transport._mapped[region.name]
    # views of the server's mapping of the client's region: no copy, and registered once for both tensors
    assert got["q"].data_ptr() == mapped.address + header.tensors[0].shm.offset
    assert torch.equal(got["k"], small_inputs()[1][1]) and transport.bytes_direct_in == got["q"].nbytes * 2
    assert len(reg.live) == 1 and transport.pinned_bytes() == 1 << 20 and holds == [mapped]  # one hold per region
    assert mapped.users == 1
    with transport._lock:
        transport._mapped.pop(region.name).evict()  # evicted while a call still uses it: stays pinned
    assert len(reg.live) == 1
    transport.release(holds)
    assert reg.live == {} and reg.log == [("pin", mapped.address), ("unpin", mapped.address)] and holds == []
    assert transport.pinned_bytes() == 0
    region.close()


def test_unpinnable_regions_are_left_for_the_staging_copy():
    for budget, fail in ((1 << 19, False), (1 << 30, True)):  # over the budget; registration refused
        transport, reg = pinned_transport(budget, fail)
        region = client_shm.Region(1 << 20, memfd=True)
        holds = []
        got = transport.read_inputs(shm_request(region), names={"q"}, borrow={"q"}, holds=holds)
        assert got == {} and holds == [] and reg.live == {} and transport.bytes_direct_in == 0
        region.close()
    file_region = client_shm.Region(1 << 20, memfd=False)  # a /dev/shm file is never mapped, so never pinned
    transport, reg = pinned_transport()
    assert transport.read_inputs(shm_request(file_region), names={"q"}, borrow={"q"}, holds=[]) == {}
    assert transport.output_placer(shm_request(file_region), []) is None
    file_region.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_placer_gives_the_places_write_outputs_uses(monkeypatch, dtype):
    transport, reg = pinned_transport()
    region = client_shm.Region(1 << 20, memfd=True)
    header = shm_request(region)
    holds = []
    place = transport.output_placer(header, holds)
    g = torch.Generator().manual_seed(5)
    outputs = {"out": torch.randn(16, 2, 8, generator=g).to(dtype), "softmax_lse": torch.randn(2, 16, generator=g)}
    stats = []  # liveness checks (a stat of /proc/PID/fd/N): only needed when something is left to write
    real_alive = server_shm._Mapped.alive
    monkeypatch.setattr(server_shm._Mapped, "alive", lambda self: stats.append(1) or real_alive(self))
    direct = {}
    for name, t in outputs.items():  # what the CUDA copy-out does: the device-to-host copy lands in the place
        dst = place(name, t)
        assert dst is not None and dst.shape == t.shape and dst.dtype == t.dtype
        dst.copy_(t)
        direct[name] = dst
    assert place("out", outputs["out"]).data_ptr() == direct["out"].data_ptr()  # a retried job: same place
    descs = transport.write_outputs(header, direct)
    assert transport.bytes_direct_out == sum(t.nbytes for t in outputs.values())  # nothing copied again
    assert stats == []
    for d in descs:
        assert torch.equal(region.take(d.shm.offset, wire.PROTO_TO_TORCH[d.dtype], d.shape), outputs[d.name])
    # staged outputs (the placer said no) are copied by write_outputs as before
    staged = {n: t.clone() for n, t in outputs.items()}
    before = transport.bytes_direct_out
    transport.write_outputs(header, staged)
    assert transport.bytes_direct_out == before and stats == [1]
    transport.release(holds)
    assert len(reg.live) == 1  # still cached (not evicted): pinned for the next call
    late = transport.output_placer(shm_request(region, output_offset=(1 << 20) - 256), [])
    assert late("out", outputs["out"]) is None  # would not fit: staging, and write_outputs raises
    region.close()


CALL_REJECTS = {
    "a tensor in chunks": (lambda h: h.tensors[0].ClearField("shm"), "every tensor must be a shared-memory slice"),
    "no output region": (lambda h: h.ClearField("output_region"), "output_region"),
    "no operation": (lambda h: setattr(h, "operation", pb.OPERATION_UNSPECIFIED), "operation"),
}


@pytest.mark.parametrize("case", list(CALL_REJECTS))
def test_call_rejects_what_one_message_cannot_carry(shm_server, region, case):
    header = shm_request(region)
    change, words = CALL_REJECTS[case]
    change(header)
    with pytest.raises(grpc.RpcError) as err:
        call_unary(shm_server.target, header)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), err.value.details()
    still_serving(shm_server.target, shm=True)


def test_client_sends_shm_requests_as_one_message_and_falls_back_to_streams(shm_server):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 40, 2, 16, generator=g).requires_grad_(True) for _ in range(3))
    ref, leaves = reference(q, k, v, True)
    ref.sum().backward()

    def no_streams(*args, **kw):
        raise AssertionError("a stream was opened for a request wholly in shared memory")

    with flashserve.Client(shm_server.target, timeout=30, transport="shm") as c:
        c._streams = {"Forward": no_streams, "Backward": no_streams}
        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
        out.sum().backward()  # backward (with kept residuals) in one message too
        assert rel_err(out, ref) < 1e-5
        assert all(rel_err(t.grad, r.grad) < 1e-5 for t, r in zip((q, k, v), leaves))
        assert c.bytes_sent == 0 and c.bytes_received == 0 and c._unary_ok

    class Unimplemented(grpc.RpcError):  # what a server without Call answers
        def code(self):
            return grpc.StatusCode.UNIMPLEMENTED

        def details(self):
            return "Method not found!"

    def old_server(*args, **kw):
        raise Unimplemented()

    with flashserve.Client(shm_server.target, timeout=30, transport="shm") as c:
        c._unary_call = old_server
        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
        assert rel_err(out, ref) < 1e-5 and not c._unary_ok and c.shm_bytes_sent > 0


def test_results_outlive_the_client_that_made_them(shm_server):
    """Results are views of the client's output regions: closing the client must not unmap them under the caller
    (it used to, and reading such a result then crashed the process)."""
    q = torch.randn(1, 64, 2, 16)
    ref, _ = reference(q, q, q, False)
    for memfd in (True, False):
        with flashserve.Client(shm_server.target, timeout=30, transport="shm") as c:
            c._regions = client_shm.RegionPool(memfd=memfd)
            out, lse, _ = flashserve.flash_attn_func(q, q, q, return_attn_probs=True, client=c)
            region = c._regions.regions()[-1]
        assert region._bytes is None  # closed: nothing of it is reused, its file is gone
        out = out + 0  # touching the memory of a closed client's region
        assert rel_err(out, ref) < 1e-5 and torch.isfinite(lse).all()


def test_closing_the_transport_unpins_what_no_call_uses():
    transport, reg = pinned_transport()
    regions = [client_shm.Region(1 << 20, memfd=True) for _ in range(2)]
    holds = []
    for r in regions:
        transport.read_inputs(shm_request(r), names={"q"}, borrow={"q"}, holds=holds)
    busy = holds.pop()  # a call still running on the second region; the first one's call is over
    transport.release(holds)
    assert len(reg.live) == 2  # still cached: both stay pinned for the next calls
    transport.close()
    assert transport.mapped_regions() == 0 and len(reg.live) == 1  # the idle one unpinned at once
    transport.release([busy])
    assert reg.live == {}  # the other when its call ended
    for r in regions:
        r.close()


def test_typed_views_of_a_mapping_are_its_bytes():
    """_Mapped.typed_view (slices of cached bases, one per dtype, row shape and phase) reads and writes the region
    itself, at any aligned offset and shape, including offsets that are not a multiple of the row size."""
    region = client_shm.Region(1 << 16, memfd=True)
    try:
        mapped = server_shm._Mapped(region.name, "t")
        raw = torch.frombuffer(bytearray(os.urandom(1 << 16)), dtype=torch.uint8)
        region.put(raw, 0)
        for dtype, offset, shape in ((torch.bfloat16, 128, (3, 5, 2)), (torch.float32, 4096, (7,)),
                                     (torch.int32, 60, (2, 2)), (torch.float16, 64, (4, 1, 3)),
                                     (torch.bfloat16, 130, (3, 5, 2)), (torch.bfloat16, 0, (1, 5, 2)),
                                     (torch.float32, 8, (16, 3)), (torch.float32, 12, ()), (torch.int32, 62, (2,)),
                                     (torch.bfloat16, (1 << 16) - 20, (1, 5, 2)), (torch.float32, 4, (0, 3))):
            view = mapped.typed_view(offset, dtype, shape)
            nbytes = dtype.itemsize * view.numel()
            assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
            if nbytes:
                assert view.data_ptr() == mapped.address + offset
            assert torch.equal(view.reshape(-1).view(torch.uint8), raw[offset:offset + nbytes])
        for i in range(server_shm._Mapped._MAX_BASES + 5):  # many row shapes: the cache stays bounded
            view = mapped.typed_view(4 * i, torch.float32, (2, i + 1))
            assert torch.equal(view.reshape(-1).view(torch.uint8), raw[4 * i:4 * i + 8 * (i + 1)])
        assert len(mapped._bases) <= server_shm._Mapped._MAX_BASES
        view = mapped.typed_view(256, torch.float32, (4,))
        view.copy_(torch.arange(4.0))  # writes land in the region (the GPU's direct copy-out uses these views)
        assert torch.equal(mapped.typed_view(256, torch.float32, (4,)), torch.arange(4.0))
        with pytest.raises(ValueError):
            mapped.typed_view(mapped.size() - 8, torch.float32, (4,))
        with pytest.raises(ValueError):
            mapped.typed_view(mapped.size() - 16, torch.bfloat16, (2, 5, 2))
    finally:
        region.close()


def test_client_region_put_copies_large_tensors_in_parts(monkeypatch):
    """Past HELD_COPY_BYTES a CPU tensor's bytes go through copy_bytes, in parts on threads past COPY_SPLIT_BYTES."""
    monkeypatch.setattr(client_shm, "HELD_COPY_BYTES", 1024)
    monkeypatch.setattr(client_shm, "COPY_SPLIT_BYTES", 1000)  # 4200 bytes: in parts (on a 1-cpu host, 2)
    parts = []
    copy_part = client_shm.np.copyto
    monkeypatch.setattr(client_shm.np, "copyto", lambda dst, src: (parts.append(len(src)), copy_part(dst, src)))
    region = client_shm.Region(1 << 16, memfd=True)
    try:
        t = torch.randn(300, 7).bfloat16()
        region.put(t, 192)
        assert torch.equal(region.view(192, t.dtype, t.shape), t)
        assert len(parts) >= 2 and sum(parts) == t.numel() * 2
    finally:
        region.close()


def test_client_region_put_keeps_the_gil_beside_a_busy_thread():
    """A 1 MB put beside a Python-busy thread takes about a memory copy's time: it releases the GIL nowhere, so it
    never waits up to a switch interval (5 ms) to get it back (torch's copy_ took 13 ms there, numpy's 4-5 ms)."""
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    region = client_shm.Region(2 << 20, memfd=True)
    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        t = torch.randn(512, 16, 64).bfloat16()
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            region.put(t, 64)
            times.append(time.perf_counter() - t0)
        assert sorted(times)[10] < 2e-3, times
        assert torch.equal(region.view(64, t.dtype, t.shape), t)
    finally:
        stop.set()
        thread.join()
        region.close()


def test_client_region_views_and_puts_are_its_bytes_and_idle_tracks_them():
    """client Region.view (slices of cached bases) and put (byte copies of contiguous CPU tensors, torch's copy
    otherwise) read and write the region's bytes at any aligned offset; idle() is true exactly when no view is held,
    however many bases are cached (the client reuses an output region only then)."""
    region = client_shm.Region(1 << 16, memfd=True)
    try:
        raw = torch.frombuffer(bytearray(os.urandom(1 << 16)), dtype=torch.uint8)
        region.put(raw, 0)
        for dtype, offset, shape in ((torch.bfloat16, 130, (3, 5, 2)), (torch.float32, 8, (16, 3)),
                                     (torch.int32, 60, (2,)), (torch.float16, 64, ()), (torch.float32, 4, (0, 3)),
                                     (torch.bfloat16, (1 << 16) - 20, (1, 5, 2))):
            view = region.view(offset, dtype, shape)
            nbytes = dtype.itemsize * view.numel()
            assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
            assert torch.equal(view.reshape(-1).view(torch.uint8), raw[offset:offset + nbytes])
        with pytest.raises(ValueError, match="outside region"):
            region.view(region.size - 16, torch.bfloat16, (2, 5, 2))
        for t, offset in ((torch.tensor([0, 5, 9], dtype=torch.int32), 4),
                          (torch.randn(40, 3).bfloat16(), 2),
                          (torch.randn(5000, 4), 8),
                          (torch.randn(5000, 4, requires_grad=True), 64),  # no detach needed for a byte copy
                          (torch.randn(10, 6)[2:7], 256),  # a contiguous slice: its own bytes, not its base's
                          (torch.randn(6, 4).t(), 100)):  # non-contiguous source: torch copies
            assert region.put(t, offset) == t.numel() * t.element_size()
            assert torch.equal(region.view(offset, t.dtype, t.shape), t.detach())
        with pytest.raises(ValueError, match="outside region"):
            region.put(torch.zeros(8), region.size - 16)
        del view
        assert region.idle()
        held = region.view(128, torch.float32, (4, 4))
        assert not region.idle()
        for i in range(client_shm.MAX_VIEW_BASES + 3):  # past the cache's bound: bases dropped and remade
            region.view(4 * i, torch.float32, (1, i + 1))
        assert not region.idle()
        del held
        assert region.idle()
    finally:
        region.close()
