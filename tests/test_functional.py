"""Every flash_attn-style function and module, over a real loopback server, against the independent
float64 reference: outputs, LSE and gradients of q, k, v."""
from __future__ import annotations

import pytest
import torch

import flashserve
from naive import TOL, naive_attention, rel_err

LENGTHS = [1, 2, 17, 128, 700]  # 700: the long one of this mix (test_long_sequence_* goes past one row block)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _rand(*shape, dtype=torch.float32, seed=None, grad=True):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2 ** 31, ()).item())
    t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)
    return t.requires_grad_(grad)


def _check_grads(out, ref_out, inputs, ref_inputs, dtype, names=("q", "k", "v")):
    g = torch.randn_like(out.detach().float()).to(out.dtype)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref_out, ref_inputs, g.double())
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype
        err = rel_err(a, b)
        assert err < TOL[dtype] * 2, f"d{name} error {err:.2e}"


def _varlen_case(client, lengths_q, lengths_k, heads, heads_k, dim, dtype, **kw):
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    q = _rand(int(cu_q[-1]), heads, dim, dtype=dtype)
    k = _rand(int(cu_k[-1]), heads_k, dim, dtype=dtype)
    v = _rand(int(cu_k[-1]), heads_k, dim, dtype=dtype)
    out, lse, _ = flashserve.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                    return_attn_probs=True, client=client, **kw)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    window = kw.get("window_size", (-1, -1))
    ref_out, ref_lse = naive_attention(*refs, cu_q, cu_k, scale=kw.get("softmax_scale"), causal=kw.get("causal", False),
                                       window=window, softcap=kw.get("softcap", 0.0), alibi=kw.get("alibi_slopes"))
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (heads, int(cu_q[-1])) and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < TOL[dtype], "out"
    assert rel_err(lse, ref_lse) < 1e-5, "lse"
    _check_grads(out, ref_out, (q, k, v), refs, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_varlen_mixed_lengths(client, causal, dtype):
    _varlen_case(client, LENGTHS, LENGTHS, 4, 4, 64, dtype, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_seqlen_q_differs_from_k(client, causal):
    # bottom-right causal alignment: more keys than queries and more queries than keys (rows with no key)
    _varlen_case(client, [3, 40, 1, 64], [10, 17, 5, 64], 4, 2, 32, torch.float32, causal=causal)


def test_long_sequence_crosses_row_blocks(client):
    # the torch backend works in blocks of 1024 query rows: a 1100-row sequence spans two
    _varlen_case(client, [1100], [1100], 2, 1, 32, torch.float32, causal=True)


@pytest.mark.parametrize("dim", [8, 40, 72, 96, 128, 160, 192, 256])
def test_head_dim_classes(client, dim):
    _varlen_case(client, [17, 33], [17, 40], 2, 1, dim, torch.bfloat16, causal=dim % 16 == 0)


@pytest.mark.parametrize("heads,heads_k", [(8, 1), (8, 2), (6, 3)])
def test_gqa_mqa(client, heads, heads_k):
    _varlen_case(client, [5, 64], [9, 64], heads, heads_k, 32, torch.float32, causal=True)


def test_window_softcap_alibi_scale(client):
    alibi = torch.rand(4) * 0.5
    _varlen_case(client, [40, 90], [50, 90], 4, 2, 32, torch.float32, window_size=(8, 3), softcap=5.0,
                 alibi_slopes=alibi, softmax_scale=0.3)


def test_alibi_per_sequence_and_causal_window(client):
    alibi = torch.rand(2, 4)
    _varlen_case(client, [30, 70], [30, 80], 4, 4, 32, torch.float32, causal=True, window_size=(16, -1),
                 alibi_slopes=alibi)


def test_empty_sequence_in_batch(client):
    # equal consecutive cu_seqlens entries: an empty sequence between two others
    _varlen_case(client, [5, 0, 7], [6, 0, 7], 2, 2, 16, torch.float32, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_fixed_length(client, causal):
    b, sq, sk, h, hk, d = 3, 37, 50, 4, 2, 64
    q, k, v = _rand(b, sq, h, d), _rand(b, sk, hk, d), _rand(b, sk, hk, d)
    out, lse, s = flashserve.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, client=client)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32)
    ref_out, ref_lse = naive_attention(*(r.reshape(-1, *r.shape[2:]) for r in refs), cu_q, cu_k, causal=causal)
    ref_out = ref_out.view(b, sq, h, d)
    assert out.shape == (b, sq, h, d)
    assert lse.shape == (b, h, sq)
    assert s.shape == (b, h, 128, 128)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert rel_err(lse, ref_lse.view(h, b, sq).transpose(0, 1)) < 1e-5
    _check_grads(out, ref_out, (q, k, v), refs, torch.float32)
    plain = flashserve.flash_attn_func(q, k, v, causal=causal, client=client)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


def test_qkvpacked_and_kvpacked(client):
    b, s, h, d = 2, 33, 4, 32
    qkv = _rand(b, s, 3, h, d)
    out = flashserve.flash_attn_qkvpacked_func(qkv, causal=True, client=client)
    ref_qkv = qkv.detach().double().requires_grad_(True)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    flat = ref_qkv.reshape(b * s, 3, h, d)
    ref_out, _ = naive_attention(flat[:, 0], flat[:, 1], flat[:, 2], cu, cu, causal=True)
    ref_out = ref_out.view(b, s, h, d)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    _check_grads(out, ref_out, (qkv,), (ref_qkv,), torch.float32, names=("qkv",))

    q, kv = _rand(b, s, h, d), _rand(b, 45, 2, 2, d)
    out = flashserve.flash_attn_kvpacked_func(q, kv, client=client)
    rq, rkv = q.detach().double().requires_grad_(True), kv.detach().double().requires_grad_(True)
    cu_k = torch.arange(0, (b + 1) * 45, 45, dtype=torch.int32)
    fkv = rkv.reshape(b * 45, 2, 2, d)
    ref_out, _ = naive_attention(rq.reshape(b * s, h, d), fkv[:, 0], fkv[:, 1], cu, cu_k)
    ref_out = ref_out.view(b, s, h, d)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    _check_grads(out, ref_out, (q, kv), (rq, rkv), torch.float32, names=("q", "kv"))


def test_varlen_packed_variants_and_aliases(client):
    lengths = [1, 17, 64]
    cu = _cu(lengths)
    qkv = _rand(int(cu[-1]), 3, 4, 32)
    out = flashserve.flash_attn_varlen_qkvpacked_func(qkv, cu, 64, causal=True, client=client)
    ref_qkv = qkv.detach().double().requires_grad_(True)
    ref_out, _ = naive_attention(ref_qkv[:, 0], ref_qkv[:, 1], ref_qkv[:, 2], cu, cu, causal=True)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    _check_grads(out, ref_out, (qkv,), (ref_qkv,), torch.float32, names=("qkv",))

    cu_k = _cu([5, 20, 30])
    q, kv = _rand(int(cu[-1]), 4, 32), _rand(int(cu_k[-1]), 2, 2, 32)
    out = flashserve.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 64, 30, causal=True, client=client)
    rq, rkv = q.detach().double().requires_grad_(True), kv.detach().double().requires_grad_(True)
    ref_out, _ = naive_attention(rq, rkv[:, 0], rkv[:, 1], cu, cu_k, causal=True)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    _check_grads(out, ref_out, (q, kv), (rq, rkv), torch.float32, names=("q", "kv"))

    assert flashserve.flash_attn_unpadded_func is flashserve.flash_attn_varlen_func
    assert flashserve.flash_attn_unpadded_qkvpacked_func is flashserve.flash_attn_varlen_qkvpacked_func
    assert flashserve.flash_attn_unpadded_kvpacked_func is flashserve.flash_attn_varlen_kvpacked_func


def test_modules(client):
    b, s, h, d = 2, 20, 4, 32
    self_attn = flashserve.FlashSelfAttention(causal=True, client=client)
    qkv = _rand(b, s, 3, h, d)
    out = self_attn(qkv)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    flat = qkv.detach().double().reshape(b * s, 3, h, d)
    ref, _ = naive_attention(flat[:, 0], flat[:, 1], flat[:, 2], cu, cu, causal=True)
    assert rel_err(out, ref.view(b, s, h, d)) < TOL[torch.float32]
    out_var = self_attn(qkv.detach().reshape(b * s, 3, h, d), cu_seqlens=cu, max_seqlen=s)
    assert rel_err(out_var, ref) < TOL[torch.float32]
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()

    cross = flashserve.FlashCrossAttention(softmax_scale=0.2, client=client)
    q, kv = _rand(b, s, h, d), _rand(b, 30, 2, 2, d)
    out = cross(q, kv)
    cu_k = torch.arange(0, (b + 1) * 30, 30, dtype=torch.int32)
    fkv = kv.detach().double().reshape(b * 30, 2, 2, d)
    ref, _ = naive_attention(q.detach().double().reshape(b * s, h, d), fkv[:, 0], fkv[:, 1], cu, cu_k, scale=0.2)
    assert rel_err(out, ref.view(b, s, h, d)) < TOL[torch.float32]
    out_var = cross(q.detach().reshape(b * s, h, d), kv.detach().reshape(b * 30, 2, 2, d), cu_seqlens=cu,
                    max_seqlen=s, cu_seqlens_k=cu_k, max_seqlen_k=30)
    assert rel_err(out_var, ref) < TOL[torch.float32]


def test_default_client_from_environment(server, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_TARGET", server.target)
    monkeypatch.setattr("flashserve.client._default", None)
    q = _rand(1, 8, 2, 16, grad=False)
    out = flashserve.flash_attn_func(q, q, q)
    ref, _ = naive_attention(q[0], q[0], q[0], torch.tensor([0, 8], dtype=torch.int32),
                             torch.tensor([0, 8], dtype=torch.int32))
    assert rel_err(out[0], ref) < TOL[torch.float32]
    assert flashserve.default_client().target == server.target


def test_results_keep_caller_dtype_and_layout(client):
    q = _rand(2, 9, 2, 16, dtype=torch.float16, grad=False)
    out = flashserve.flash_attn_func(q, q, q, client=client)
    assert out.dtype == torch.float16 and out.device == q.device and out.is_contiguous()
