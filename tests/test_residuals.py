"""Server-side residuals: backward sends only dout, eviction (budget, TTL) is recovered transparently, Release
frees the budget."""
from __future__ import annotations

import gc
import time

import grpc
import pytest
import torch

import flashserve
from flashserve.autograd import make_params
from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.backends.base import AttentionParams
from flashserve.server.residuals import ResidualStore
from flashserve.server.scheduler import Job
from flashserve.server.validation import RequestError, Shapes
from naive import rel_err


def qkv(n=64, h=2, d=16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=g).requires_grad_(grad) for _ in range(3)]


def reference(q, k, v, causal=True):
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2),
                                                           v2.transpose(1, 2), is_causal=causal).transpose(1, 2)
    return out, (q2, k2, v2)


def set_bytes(n=64, h=2, d=16):
    """Bytes of one kept set: q, k, v, out (fp32) + lse + two cu_seqlens."""
    return 4 * n * h * d * 4 + h * n * 4 + 2 * 2 * 4


# ---- the store alone ------------------------------------------------------------------------------
def fake_job(nbytes_q=1000):
    n = nbytes_q // 4
    t = {"q": torch.zeros(n, 1, 1), "k": torch.zeros(n, 1, 1), "v": torch.zeros(n, 1, 1),
         "cu_seqlens_q": torch.tensor([0, n], dtype=torch.int32), "cu_seqlens_k": torch.tensor([0, n], dtype=torch.int32)}
    return Job("forward", t, AttentionParams(softmax_scale=1.0, seed=5, offset=3),
               Shapes(n, n, 1, 1, 1, 1, torch.float32)), {"out": torch.zeros(n, 1, 1), "softmax_lse": torch.zeros(1, n)}


def test_store_budget_ttl_release():
    now = [0.0]
    size = 5 * 1000 + 16  # q k v out lse + cu_seqlens
    store = ResidualStore(budget_bytes=2 * size + 10, ttl_s=10, clock=lambda: now[0])
    a, b, c = (store.keep(*fake_job()) for _ in range(3))
    assert a and b and c and store.used_bytes == 2 * size
    assert a not in store and b in store and c in store  # the oldest went first
    with pytest.raises(RequestError) as err:
        store.take(a)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "residual" in err.value.message
    store.take(b)  # b used: c is now the oldest
    d = store.keep(*fake_job())
    assert c not in store and b in store and d in store
    kept = store.take(b)
    assert kept.params.seed == 5 and kept.params.offset == 3  # RNG state kept with the tensors
    assert kept.merge_params(AttentionParams(softmax_scale=1.0, deterministic=True)).seed == 5
    assert store.release([b, "nope"]) == 1 and store.used_bytes == size
    now[0] += 11  # TTL
    assert d not in store and store.used_bytes == 0 and store.evictions == 3
    assert store.keep(*fake_job(10_000)) == ""  # bigger than the whole budget: not kept


# ---- over a real server ---------------------------------------------------------------------------
@pytest.fixture()
def small_store_server():
    # room for one 64-token set, not two
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", residual_bytes=int(set_bytes() * 1.5))
    with BackgroundServer(cfg) as srv:
        yield srv


def test_backward_sends_only_dout(small_store_server):
    srv = small_store_server
    with flashserve.Client(srv.target, timeout=60, transport="bytes") as c:
        assert c.server_info().residuals
        q, k, v = qkv()
        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
        assert len(srv.service.residuals) == 1
        fwd_sent = c.bytes_sent
        out.backward(torch.ones_like(out))
        bwd_sent = c.bytes_sent - fwd_sent
        assert bwd_sent == out.numel() * 4  # dout alone
        ref, leaves = reference(q, k, v)
        ref.backward(torch.ones_like(ref))
        for got, want in zip((q.grad, k.grad, v.grad), leaves):
            assert rel_err(got, want.grad) < 1e-5


def test_evicted_residuals_are_resent_transparently(small_store_server):
    srv = small_store_server
    with flashserve.Client(srv.target, timeout=60, transport="bytes") as c:
        q, k, v = qkv(seed=1)
        out_a = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
        evictions = srv.service.residuals.evictions
        q2, k2, v2 = qkv(seed=2)
        out_b = flashserve.flash_attn_func(q2, k2, v2, causal=True, client=c)  # pushes A out of the budget
        assert srv.service.residuals.evictions == evictions + 1
        sent = c.bytes_sent
        out_a.sum().backward()  # FAILED_PRECONDITION inside, then a full resend
        assert c.bytes_sent - sent > 4 * out_a.numel() * 4  # dout (refused) + dout, q, k, v, out again
        ref, leaves = reference(q, k, v)
        ref.sum().backward()
        for got, want in zip((q.grad, k.grad, v.grad), leaves):
            assert rel_err(got, want.grad) < 1e-5
        out_b.sum().backward()  # B's residuals are still there
        assert q2.grad is not None


def test_ttl_expiry_is_recovered():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", residual_ttl_s=0.2)
    with BackgroundServer(cfg) as srv, flashserve.Client(srv.target, timeout=60, transport="bytes") as c:
        q, k, v = qkv(seed=3)
        out = flashserve.flash_attn_func(q, k, v, client=c)
        time.sleep(0.3)
        out.sum().backward()
        ref, leaves = reference(q, k, v, causal=False)
        ref.sum().backward()
        assert rel_err(q.grad, leaves[0].grad) < 1e-5
        assert srv.service.residuals.evictions == 1


def test_release_frees_the_budget(small_store_server):
    srv = small_store_server
    store = srv.service.residuals
    with flashserve.Client(srv.target, timeout=60, transport="bytes") as c:
        q, k, v = qkv(seed=4)
        out = flashserve.flash_attn_func(q, k, v, client=c)
        assert store.used_bytes == set_bytes()
        del out  # the graph goes: weakref.finalize sends Release
        gc.collect()
        deadline = time.monotonic() + 5
        while store.used_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.used_bytes == 0 and len(store) == 0 and store.evictions == 0
        # explicit Release through the client: counts what it freed
        params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, 64, 64, False)
        cu = torch.tensor([0, 64], dtype=torch.int32)
        reply, _ = c.forward(q[0].detach(), k[0].detach(), v[0].detach(), cu, cu, params, keep_residuals=True)
        assert reply.residual_handle and store.used_bytes == set_bytes()
        assert c.release([reply.residual_handle]) == 1 and store.used_bytes == 0
        assert c.release([reply.residual_handle]) == 0
        with pytest.raises(flashserve.ResidualsEvicted):
            c.backward(torch.zeros(64, 2, 16), params, residual_handle=reply.residual_handle)


def test_no_residuals_when_disabled():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", residual_bytes=0)
    with BackgroundServer(cfg) as srv, flashserve.Client(srv.target, timeout=60, transport="bytes") as c:
        assert not c.server_info().residuals and srv.service.residuals is None
        q, k, v = qkv(seed=5)
        out = flashserve.flash_attn_func(q, k, v, client=c)
        out.sum().backward()
        assert q.grad is not None
