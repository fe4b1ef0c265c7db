"""GPU tests of the CUDA backward kernels (csrc/bwd/), run on a lent GPU with pytest.

Gradients are compared with autograd through a float32 torch implementation of the same masked attention
(same dropout mask: server/backends/philox.py mirrors csrc/common/dropout.cuh bit for bit). Each case's bound is
twice the error of torch SDPA's FlashAttention backward on the same inputs against its own float32 reference,
plus a small floor. Where SDPA cannot compute the case's function (dropout with our RNG, window, softcap,
ALiBi, bottom-right causal with seqlen_q != seqlen_k), the scale is the larger of SDPA's error on the nearest
function it does compute (same inputs, plain causal or not) and the error of torch autograd in the input dtype on
the case's own function. O and LSE come from the float32 reference, so the test does not
depend on the forward kernel.

The kernels are flashserve._C.bwd; cases whose head-dim class or dtype the build left out are skipped. Speed is
measured by `bench/kernels.py --ops bwd`, not here. FLASHSERVE_BWD_REPORT=path appends one line of errors per case.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD_DIMS = (32, 64, 96, 128, 192, 256)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _philox():
    spec = importlib.util.spec_from_file_location("fs_philox", os.path.join(REPO, "server", "backends", "philox.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# The kernels: flashserve._C.bwd (csrc/binding.cpp).


def _compiled():
    try:
        from flashserve import _C
    except ImportError:
        return None
    return _C.compiled_configs() if hasattr(_C, "bwd") else None


def compiled_head_dims():
    cfg = _compiled()
    return sorted(cfg["head_dims"]) if cfg else []


def compiled_dtypes():
    cfg = _compiled()
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    return [names[n] for n in cfg["dtypes"]] if cfg else []


def get_bwd():
    from flashserve import _C

    if not hasattr(_C, "bwd"):
        pytest.skip("flashserve._C has no bwd")
    return _C.bwd


# ----------------------------------------------------------------------------------------------
# Float32 reference.


def ref_attention(q, k, v, cu_q, cu_k, scale, causal=False, wl=-1, wr=-1, softcap=0.0, alibi=None, p_drop=0.0,
                  seed=0, offset=0):
    """Packed varlen attention in the dtype of q (float32 for the reference). Returns out, lse (h, total_q)."""
    hq, hk = q.shape[1], k.shape[1]
    grp = hq // hk
    if causal:
        wr = 0
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    philox = _philox() if p_drop > 0 else None
    for b in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        sq, sk = qs.shape[0], ks.shape[0]
        if sq == 0:
            continue
        ke, ve = ks.repeat_interleave(grp, dim=1), vs.repeat_interleave(grp, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ke)
        t = softcap * torch.tanh(s * scale / softcap) if softcap > 0 else s * scale
        i = torch.arange(sq, device=q.device).view(-1, 1)
        j = torch.arange(sk, device=q.device).view(1, -1)
        if alibi is not None:
            slope = alibi[b] if alibi.dim() == 2 else alibi
            t = t - (slope.view(-1, 1, 1) * (i + sk - sq - j).abs()).to(t.dtype)
        vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if wr >= 0:
            vis &= j <= i + sk - sq + wr
        if wl >= 0:
            vis &= j >= i + sk - sq - wl
        any_ = vis.any(-1)
        t = t.masked_fill(~vis, float("-inf"))
        t = torch.where(any_.view(1, -1, 1), t, torch.zeros((), device=q.device, dtype=t.dtype))
        lse = torch.logsumexp(t, -1)
        pr = torch.exp(t - lse.unsqueeze(-1)) * any_.view(1, -1, 1)
        if p_drop > 0:
            keep = philox.dropout_keep_mask(seed, offset, b * hq, hq, sq, sk, p_drop, device=q.device)
            pr = pr * keep / (1.0 - p_drop)
        outs.append(torch.einsum("hqk,khd->qhd", pr, ve))
        lses.append(torch.where(any_.view(1, -1), lse, torch.full_like(lse, float("inf"))))
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, hq, v.shape[2])
    lse = torch.cat(lses, 1) if lses else q.new_zeros(hq, 0)
    return out, lse


def sdpa_flash_error(q, k, v, dout, cu_q, cu_k, scale, causal):
    """Max abs error of torch SDPA FLASH's (dq, dk, dv) on the same inputs, per sequence, against a float32
    reference of the function it computes (causal only where seqlen_q == seqlen_k, no other features)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hk = q.shape[1], k.shape[1]
    grp = hq // hk
    errs = [0.0, 0.0, 0.0]
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cu_q) - 1):
        sl_q, sl_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        if sq == 0 or sk == 0:
            continue
        is_causal = causal and sq == sk
        res = []
        for dtype in (q.dtype, torch.float32):
            qs = q[sl_q].to(dtype).transpose(0, 1).unsqueeze(0).detach().requires_grad_()
            ks = k[sl_k].to(dtype).repeat_interleave(grp, 1).transpose(0, 1).unsqueeze(0).detach().requires_grad_()
            vs = v[sl_k].to(dtype).repeat_interleave(grp, 1).transpose(0, 1).unsqueeze(0).detach().requires_grad_()
            backend = SDPBackend.FLASH_ATTENTION if dtype != torch.float32 else SDPBackend.MATH
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal, scale=scale)
            o.backward(dout[sl_q].to(dtype).transpose(0, 1).unsqueeze(0))
            g = [qs.grad[0].transpose(0, 1).float()]
            for x in (ks, vs):
                gx = x.grad[0].transpose(0, 1).float()  # (sk, hq, d)
                g.append(gx.view(sk, hk, grp, -1).sum(2))
            res.append(g)
        for n in range(3):
            errs[n] = max(errs[n], (res[0][n] - res[1][n]).abs().max().item())
    return errs


# ----------------------------------------------------------------------------------------------
# One case.


def make_case(dtype, d, lens_q, lens_k=None, hq=4, hk=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(1234 + seed)
    lens_k = lens_q if lens_k is None else lens_k
    hk = hq if hk is None else hk
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, hq, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(tk, hk, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(tk, hk, d, device="cuda", generator=gen).to(dtype)
    dout = torch.randn(tq, hq, d, device="cuda", generator=gen).to(dtype)
    return q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k)


def poison_allocator(shapes, dtype):
    """Leave NaN-filled blocks of the output sizes in torch's caching allocator, so that outputs the kernels
    fail to write show up as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device="cuda") for s in shapes]
    del blocks


def run_ours(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, causal=False, wl=-1, wr=-1, softcap=0.0,
             alibi=None, p_drop=0.0, seed=0, offset=0, deterministic=False):
    from flashserve import _C

    poison_allocator([q.shape, k.shape, v.shape], q.dtype)
    _C.debug_poison_outputs(True)  # the binding also fills dq/dk/dv with NaN before the launch
    try:
        dq, dk, dv = get_bwd()(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal, wl, wr, softcap, alibi,
                               p_drop, seed, offset, deterministic)
        torch.cuda.synchronize()
    finally:
        _C.debug_poison_outputs(False)
    return dq, dk, dv


def check_case(dtype, d, lens_q, lens_k=None, hq=4, hk=None, causal=False, wl=-1, wr=-1, softcap=0.0,
               alibi_mode=None, p_drop=0.0, deterministic=False, seed=0, floor=None):
    q, k, v, dout, cu_q, cu_k, mq, mk = make_case(dtype, d, lens_q, lens_k, hq, hk, seed)
    scale = 1.0 / math.sqrt(d)
    alibi = None
    gen = torch.Generator(device="cuda").manual_seed(99 + seed)
    if alibi_mode == "h":
        alibi = torch.rand(hq, device="cuda", generator=gen) * 0.3
    elif alibi_mode == "bh":
        alibi = torch.rand(len(lens_q), hq, device="cuda", generator=gen) * 0.3
    rng = dict(seed=0x1234_5678_9ABC + seed, offset=77 + seed) if p_drop > 0 else dict(seed=0, offset=0)
    feats = dict(causal=causal, wl=wl, wr=wr, softcap=softcap, alibi=alibi, p_drop=p_drop, **rng)

    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    out_f, lse = ref_attention(qf, kf, vf, cu_q, cu_k, scale, **feats)
    out_f.backward(dout.float())
    ref = (qf.grad, kf.grad, vf.grad)
    out = out_f.detach().to(dtype)
    lse = lse.detach().float().contiguous()

    ours = run_ours(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, deterministic=deterministic, **feats)
    base = sdpa_flash_error(q, k, v, dout, cu_q, cu_k, scale, causal)
    same_fn = p_drop == 0 and wl < 0 and wr < 0 and softcap == 0 and alibi is None and (
        not causal or lens_k is None or list(lens_q) == list(lens_k))
    if not same_fn:
        # SDPA computed a nearby function only; take the larger of that error and the error of torch autograd in
        # the input dtype on this very function.
        ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out_l, _ = ref_attention(ql, kl, vl, cu_q, cu_k, scale, **feats)
        out_l.backward(dout)
        base = [max(b0, (x.grad.float() - r).abs().max().item() if r.numel() else 0.0)
                for b0, x, r in zip(base, (ql, kl, vl), ref)]
    report = []
    for name, a, r, e_sdpa in zip(("dq", "dk", "dv"), ours, ref, base):
        assert a.shape == r.shape and a.dtype == dtype, (name, a.shape, r.shape, a.dtype)
        err = (a.float() - r).abs().max().item() if a.numel() else 0.0
        fl = floor if floor is not None else 2e-3 * max(1.0, r.abs().max().item() if r.numel() else 0.0) * (
            1.0 if dtype == torch.bfloat16 else 0.25)
        bound = 2.0 * e_sdpa + fl
        report.append((name, err, e_sdpa, bound))
        rep = os.environ.get("FLASHSERVE_BWD_REPORT")
        if rep:
            with open(rep, "a") as f:
                f.write(f"{str(dtype)[6:]:8s} d={d:3d} lens_q={lens_q} lens_k={lens_k} hq={hq} hk={hk} causal={causal} "
                        f"wl={wl} wr={wr} softcap={softcap} alibi={alibi_mode} p={p_drop} det={deterministic} "
                        f"{name}: ours {err:.3e} {'sdpa' if same_fn else 'base'} {e_sdpa:.3e} bound {bound:.3e}\n")
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten or NaN)"
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (sdpa flash {e_sdpa:.3e}); {report}"
    return report, (q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, feats)


# ----------------------------------------------------------------------------------------------
# Tests.

DTYPES = [torch.bfloat16, torch.float16]
VARLEN = [1, 17, 128, 0, 300, 65]


def _skip_uncompiled(dtype, d):
    cls = next(c for c in HEAD_DIMS if c >= (d + 7) // 8 * 8)
    if cls not in compiled_head_dims() or dtype not in compiled_dtypes():
        pytest.skip(f"head-dim class {cls} / {dtype} not compiled")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims_varlen(dtype, d, causal):
    _skip_uncompiled(dtype, d)
    check_case(dtype, d, VARLEN, causal=causal)


@pytest.mark.parametrize("d", [40, 59, 72])
def test_odd_head_dims(d):
    _skip_uncompiled(torch.bfloat16, d)
    check_case(torch.bfloat16, d, [33, 200], causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_q_ne_k(dtype, causal):
    _skip_uncompiled(dtype, 128)
    check_case(dtype, 128, [5, 64, 200, 0, 1], [17, 300, 129, 9, 0], causal=causal)
    check_case(dtype, 128, [300, 7], [40, 130], causal=causal)  # more queries than keys: empty rows


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa(hq, hk, d):
    _skip_uncompiled(torch.bfloat16, d)
    check_case(torch.bfloat16, d, [100, 1, 260], [140, 33, 260], hq=hq, hk=hk, causal=True)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout(d, causal):
    _skip_uncompiled(torch.bfloat16, d)
    check_case(torch.bfloat16, d, [130, 1, 77, 0], [200, 5, 77, 3], hq=4, hk=2, causal=causal, p_drop=0.17)


@pytest.mark.parametrize("d", [64, 128])
def test_window_softcap_alibi(d):
    _skip_uncompiled(torch.bfloat16, d)
    check_case(torch.bfloat16, d, [200, 31, 300], wl=40, wr=7)
    check_case(torch.bfloat16, d, [200, 31, 300], [250, 31, 90], causal=True, wl=50)
    check_case(torch.bfloat16, d, [200, 31], softcap=3.0, causal=True)
    check_case(torch.bfloat16, d, [200, 31], [160, 31], alibi_mode="h", causal=True)
    check_case(torch.bfloat16, d, [200, 31], alibi_mode="bh", softcap=5.0, wl=64, wr=0, p_drop=0.1, hq=4, hk=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_long(dtype):
    _skip_uncompiled(dtype, 128)
    check_case(dtype, 128, [1000, 4097], causal=True, hq=2)
    check_case(dtype, 128, [2048], [1536], causal=False, hq=2)


# Deterministic mode has three schemes on the Hopper kernels (csrc/bwd/bwd_api.cu, plan()): dQ slices owned by one
# block each ("own"), ordered additions with counters ("counters"), and at head dim 256 dQ from dS tiles (what
# "auto" takes there; "own" / "counters" force the others); plan() picks one by shape ("auto"), and
# FLASHSERVE_BWD_DET_SPLITS forces the slice count (3 here: "own" blocks then handle several K/V blocks each,
# in the zigzag order, with a partial last round).
DET_MODES = [("auto", None), ("own", None), ("own", "3"), ("counters", None), ("counters", "2")]


@pytest.mark.parametrize("mode,splits", DET_MODES, ids=[f"{m}-{s or 'rule'}" for m, s in DET_MODES])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_deterministic(d, mode, splits, monkeypatch):
    _skip_uncompiled(torch.bfloat16, d)
    if mode != "auto":
        monkeypatch.setenv("FLASHSERVE_BWD_DET_MODE", mode)
    if splits:
        monkeypatch.setenv("FLASHSERVE_BWD_DET_SPLITS", splits)
    report, args = check_case(torch.bfloat16, d, [1000, 17, 0, 513], [900, 40, 3, 513], hq=4, hk=2, causal=True,
                              deterministic=True)
    q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, feats = args
    a = run_ours(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, deterministic=True, **feats)
    b = run_ours(q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, deterministic=True, **feats)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "deterministic mode differs between two runs"
    if mode == "own":  # also without a causal mask and without GQA (dk/dv written by the main kernel)
        check_case(torch.bfloat16, d, [700, 300], [1100, 257], hq=2, causal=False, deterministic=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_deterministic_dq_from_ds(dtype):
    """Head dim 256, deterministic: plan() takes "dQ from dS" (the main kernel writes dS tiles, a second kernel
    sums dS K per query block). Every feature of the class-256 kernel, empty sequences on either side, and rows
    past the last sequence (0 in dq, as in default mode)."""
    _skip_uncompiled(dtype, 256)
    check_case(dtype, 256, [200, 31, 0, 1, 90], [300, 31, 7, 0, 64], hq=4, hk=1, softcap=5.0, alibi_mode="bh",
               wl=64, wr=0, deterministic=True)
    check_case(dtype, 256, [129, 64, 65], [1000, 63, 200], hq=2, causal=True, deterministic=True)
    report, args = check_case(dtype, 200, [300, 77], [260, 500], hq=2, deterministic=True)  # d 200 (padded)
    q, k, v, out, lse, dout, cu_q, cu_k, mq, mk, scale, feats = args
    cu_short = cu_q.clone()
    cu_short[-1] -= 5  # the last 5 rows belong to no sequence (non-causal: the others' out / lse still hold)
    det = run_ours(q, k, v, out, lse, dout, cu_short, cu_k, mq, mk, scale, deterministic=True, **feats)
    again = run_ours(q, k, v, out, lse, dout, cu_short, cu_k, mq, mk, scale, deterministic=True, **feats)
    default = run_ours(q, k, v, out, lse, dout, cu_short, cu_k, mq, mk, scale, **feats)
    assert torch.equal(det[0][-5:], torch.zeros_like(det[0][-5:]))
    for a, b, c in zip(det, again, default):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2)


def test_d256_default_mode_by_bulk_reductions(monkeypatch):
    """Head dim 256 with "dQ from dS" off (FLASHSERVE_BWD_DQ_FROM_DS=0, or a workspace past its cap): the
    atomics / bulk-reduction kernel still computes the same gradients."""
    _skip_uncompiled(torch.bfloat16, 256)
    monkeypatch.setenv("FLASHSERVE_BWD_DQ_FROM_DS", "0")
    check_case(torch.bfloat16, 256, [1000, 17, 0, 513], [900, 40, 3, 513], hq=4, hk=2, causal=True)
    check_case(torch.bfloat16, 256, [200, 31], [160, 31], softcap=5.0, alibi_mode="h", wl=64, wr=0)


@pytest.mark.parametrize("loop", ["auto", "3"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_kv_block_loop(d, loop, monkeypatch):
    """Default mode with the K/V-block loop (FLASHSERVE_BWD_LOOP): blocks that run several K/V blocks each (3 per
    (head, sequence): zigzag order, partial last round) add into one dQ accumulator; causal, varlen, GQA, and
    dense with seqlen_q != seqlen_k."""
    _skip_uncompiled(torch.bfloat16, d)
    monkeypatch.setenv("FLASHSERVE_BWD_LOOP", loop)
    check_case(torch.bfloat16, d, [1000, 17, 0, 513], [900, 40, 3, 513], hq=4, hk=2, causal=True)
    check_case(torch.bfloat16, d, [700, 300], [1100, 257], hq=2, causal=False)


def test_rows_past_last_sequence_written():
    """Rows past cu_seqlens[-1] belong to no sequence: their gradients are written as 0."""
    _skip_uncompiled(torch.bfloat16, 64)
    q, k, v, dout, cu_q, cu_k, mq, mk = make_case(torch.bfloat16, 64, [50, 70], hq=4, hk=2)
    cu_q2, cu_k2 = cu_q.clone(), cu_k.clone()
    cu_q2[-1] -= 10
    cu_k2[-1] -= 20
    out = torch.randn_like(q)
    lse = torch.randn(4, q.shape[0], device="cuda")
    dq, dk, dv = run_ours(q, k, v, out, lse, dout, cu_q2, cu_k2, mq, mk, 0.125)
    for x in (dq, dk, dv):
        assert torch.isfinite(x).all()
    assert (dq[-10:] == 0).all() and (dk[-20:] == 0).all() and (dv[-20:] == 0).all()


def test_bad_input_message():
    _skip_uncompiled(torch.bfloat16, 64)
    q, k, v, dout, cu_q, cu_k, mq, mk = make_case(torch.bfloat16, 64, [10], hq=3, hk=2)
    lse = torch.zeros(3, q.shape[0], device="cuda")
    with pytest.raises(RuntimeError, match="multiple of heads"):
        get_bwd()(dout, q, k, v, q, lse, cu_q, cu_k, mq, mk, 0.1, False, -1, -1, 0.0, None, 0.0, 0, 0, False)


SANITIZER_CASE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import test_bwd_kernels as t
    for d in {dims!r}:
        t.check_case(torch.bfloat16, d, [70, 1, 0], [150, 9, 4], hq=4, hk=2, causal=True, p_drop=0.1, floor=1.0)
        t.check_case(torch.bfloat16, d, [70, 33], hq=2, deterministic=True, floor=1.0)
        # deterministic by ownership, blocks running several K/V blocks one after the other
        os.environ["FLASHSERVE_BWD_DET_MODE"], os.environ["FLASHSERVE_BWD_DET_SPLITS"] = "own", "2"
        t.check_case(torch.bfloat16, d, [200, 33], [300, 33], hq=2, deterministic=True, floor=1.0)
        del os.environ["FLASHSERVE_BWD_DET_MODE"], os.environ["FLASHSERVE_BWD_DET_SPLITS"]
    print("SANITIZER_CASE_DONE")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    dims = [d for d in (64, 256) if d in compiled_head_dims()]
    if not dims or torch.bfloat16 not in compiled_dtypes():
        pytest.skip("no compiled class")
    get_bwd()
    code = SANITIZER_CASE.format(tests=os.path.dirname(os.path.abspath(__file__)), dims=dims)
    cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3", "--kernel-name", "kns=bwd_",
           sys.executable, "-c", code]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0 and "SANITIZER_CASE_DONE" in r.stdout, tail
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr or "RACECHECK SUMMARY: 0 hazards" in r.stdout + r.stderr, tail
