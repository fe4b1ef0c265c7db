"""Forward kernels (flashserve._C.fwd) against a float32 reference, on a lent GPU.

Accuracy bar (issue 3): max |ours - ref| <= 2 * max |torch SDPA FLASH - ref| + 1e-5 on the same inputs,
LSE within 1e-3 relative, every output element written (outputs are NaN-poisoned before each call,
see conftest.py). Where SDPA cannot express a variant (bottom-right causal with seqlen_q != seqlen_k,
windows, softcap, ALiBi, dropout), its error on the plain attention of the same q, k, v sets the scale.

Also runnable as `python tests/gpu/test_fwd_kernels.py --sanitize` (one small case of each kernel), which
test_compute_sanitizer runs under compute-sanitizer.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEV = "cuda"
CLASSES = (32, 64, 96, 128, 192, 256)


def hd_class(d):
    d8 = (d + 7) // 8 * 8
    return next(c for c in CLASSES if d8 <= c)


def make_cu(lens):
    return torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=DEV)


def rand_inputs(q_lens, k_lens, h, hk, d, dtype, gen_seed):
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    tq, tk = int(sum(q_lens)), int(sum(k_lens))
    q = torch.randn(tq, h, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(tk, hk, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(tk, hk, d, device=DEV, dtype=dtype, generator=g)
    return q, k, v


def reference(q, k, v, q_lens, k_lens, scale, causal=False, wl=-1, wr=-1, softcap=0.0, alibi=None,
              keep=None, p_drop=0.0):
    """float32 attention per sequence. Returns out (total_q, h, d), lse (h, total_q) with +inf on empty
    rows, and the list of per-sequence probabilities (h, sq, sk)."""
    if causal:
        wr = 0
    h, hk = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=DEV)
    lse = torch.full((h, q.shape[0]), math.inf, dtype=torch.float32, device=DEV)
    probs = []
    q0 = k0 = 0
    for b, (sq, sk) in enumerate(zip(q_lens, k_lens)):
        if sq == 0:
            probs.append(None)
            k0 += sk
            continue
        qs = q[q0:q0 + sq].float()
        ks = k[k0:k0 + sk].float().repeat_interleave(h // hk, dim=1)
        vs = v[k0:k0 + sk].float().repeat_interleave(h // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(sq, device=DEV)[:, None]
        j = torch.arange(sk, device=DEV)[None, :]
        if alibi is not None:
            slope = alibi[b] if alibi.dim() == 2 else alibi
            s = s - slope[:, None, None] * (i + sk - sq - j).abs().float()
        vis = torch.ones(sq, sk, dtype=torch.bool, device=DEV)
        if wr >= 0:
            vis &= j <= i + sk - sq + wr
        if wl >= 0:
            vis &= j >= i + sk - sq - wl
        s = s.masked_fill(~vis, -math.inf)
        l = torch.logsumexp(s, dim=-1)
        p = torch.nan_to_num(torch.exp(s - l[..., None]), nan=0.0)
        probs.append(p)
        pd = p if keep is None else p * keep[b][:, :sq, :sk].float() / (1.0 - p_drop)
        out[q0:q0 + sq] = torch.einsum("hqk,khd->qhd", pd, vs)
        lse[:, q0:q0 + sq] = torch.where(torch.isneginf(l), torch.full_like(l, math.inf), l)
        q0 += sq
        k0 += sk
    return out, lse, probs


def p_rounding_error(ref_out, probs, v, q_lens, k_lens, dtype):
    """Max error of the float32 reference when its probabilities are rounded to `dtype` before P V, as a
    FlashAttention kernel does: the error floor of the exact function (softcap has no SDPA baseline, and its
    flatter probabilities round differently from the nearest function SDPA computes)."""
    h, hk = ref_out.shape[1], v.shape[1]
    err, q0, k0 = 0.0, 0, 0
    for p, sq, sk in zip(probs, q_lens, k_lens):
        if p is not None and sq and sk:
            vs = v[k0:k0 + sk].float().repeat_interleave(h // hk, dim=1)
            o = torch.einsum("hqk,khd->qhd", p.to(dtype).float(), vs)
            err = max(err, (o - ref_out[q0:q0 + sq]).abs().max().item())
        q0 += sq
        k0 += sk
    return err


def seeded_slopes(*shape, seed=7):
    """ALiBi slopes in [0, 0.1), the same on every run (tolerances are set from this run's baselines)."""
    return torch.rand(*shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)) * 0.1


def _bias_cols(bias, scale, dtype):
    """Two extra key columns (hi, lo) in `dtype` with scale * (hi + lo) ~= bias (fp32): an additive per-key
    logit bias expressed through SDPA FLASH's plain dot product (the query gets two columns of ones)."""
    x = bias / scale
    hi = x.to(dtype)
    lo = (x - hi.float()).to(dtype)
    return torch.stack([hi, lo], dim=-1)


def _sdpa_flash(q, k, v, scale, causal, bias=None):
    """q (B, H, Sq, D), k/v (B, H, Sk, D); bias None or fp32 (B, H, Sk) per-key logit bias."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = q.shape[-1]
    if bias is not None:
        q = torch.cat([q, torch.ones(*q.shape[:-1], 2, dtype=q.dtype, device=q.device)], dim=-1)
        k = torch.cat([k, _bias_cols(bias, scale, k.dtype)], dim=-1)
        v = F.pad(v, (0, 2))
    pad = (-q.shape[-1]) % 8
    q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return o[..., :d].float()


def sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=False, wl=-1, wr=-1, alibi=None):
    """max |SDPA FLASH - fp32 ref| on the same inputs, same mask and ALiBi (softcap/dropout excluded).

    SDPA FLASH has no windows, no bottom-right causal and no bias, so the same function is expressed:
    bottom-right causal = top-left causal on zero-padded (or trimmed) queries; under causal, ALiBi is a
    per-key bias slope*j (the row term cancels in softmax), put in two extra head-dim columns; windows:
    each query row with its gathered visible keys (rows grouped by key count) as its own batch entry."""
    h, hk, d = q.shape[1], k.shape[1], q.shape[2]
    if causal:
        wr = 0
    ref, _, _ = reference(q, k, v, q_lens, k_lens, scale, wl=wl, wr=wr, alibi=alibi)
    err = 0.0
    q0 = k0 = 0
    for b, (sq, sk) in enumerate(zip(q_lens, k_lens)):
        if sq == 0 or sk == 0:
            q0 += sq
            k0 += sk
            continue
        qs = q[q0:q0 + sq]
        ks = k[k0:k0 + sk].repeat_interleave(h // hk, dim=1)
        vs = v[k0:k0 + sk].repeat_interleave(h // hk, dim=1)
        slope = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi).float()
        kb, vb = ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]  # (1, h, sk, d)
        if wl < 0 and wr < 0 and slope is None:
            o = _sdpa_flash(qs.transpose(0, 1)[None], kb, vb, scale, False)[0].transpose(0, 1)
            err = max(err, (o - ref[q0:q0 + sq]).abs().max().item())
        elif wl < 0 and wr == 0:
            diag = sk - sq
            bias = None
            if slope is not None:
                bias = (slope[:, None] * torch.arange(sk, device=DEV).float()[None])[None]  # (1, h, sk)
            if diag >= 0:
                qp = torch.cat([torch.zeros(diag, h, d, dtype=q.dtype, device=DEV), qs])
                o = _sdpa_flash(qp.transpose(0, 1)[None], kb, vb, scale, True, bias)[0].transpose(0, 1)[diag:]
                err = max(err, (o - ref[q0:q0 + sq]).abs().max().item())
            else:
                o = _sdpa_flash(qs[-diag:].transpose(0, 1)[None], kb, vb, scale, True, bias)[0].transpose(0, 1)
                err = max(err, (o - ref[q0 - diag:q0 + sq]).abs().max().item())
        else:
            i = torch.arange(sq, device=DEV)
            lo = (i + sk - sq - wl).clamp_min(0) if wl >= 0 else torch.zeros_like(i)
            hi = (i + sk - sq + wr).clamp_max(sk - 1) if wr >= 0 else torch.full_like(i, sk - 1)
            n = hi - lo + 1
            for cnt in torch.unique(n[n > 0]).tolist():
                rows = torch.nonzero(n == cnt).flatten()
                idx = lo[rows][:, None] + torch.arange(cnt, device=DEV)[None]  # (R, cnt)
                kg = ks[idx].permute(0, 2, 1, 3)  # (R, h, cnt, d)
                vg = vs[idx].permute(0, 2, 1, 3)
                qg = qs[rows][:, :, None]  # (R, h, 1, d)
                bias = None
                if slope is not None:
                    dist = (rows[:, None] + sk - sq - idx).abs().float()  # (R, cnt)
                    bias = -slope[None, :, None] * dist[:, None, :]  # (R, h, cnt)
                o = _sdpa_flash(qg, kg, vg, scale, False, bias)[:, :, 0]  # (R, h, d)
                err = max(err, (o - ref[q0 + rows]).abs().max().item())
        q0 += sq
        k0 += sk
    return err


def run_fwd(C, q, k, v, q_lens, k_lens, scale, causal=False, wl=-1, wr=-1, softcap=0.0, alibi=None,
            p_drop=0.0, seed=0, offset=0, return_softmax=False, num_splits=1):
    cu_q, cu_k = make_cu(q_lens), make_cu(k_lens)
    out, lse, s = C.fwd(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale, causal, wl, wr, softcap, alibi,
                        p_drop, seed, offset, return_softmax, num_splits)
    torch.cuda.synchronize()
    return out, lse, s


def check(out, lse, ref_out, ref_lse, tol, label):
    assert out.shape == ref_out.shape, label
    assert not torch.isnan(out).any(), f"{label}: unwritten (NaN) output elements"
    assert not torch.isnan(lse).any(), f"{label}: unwritten (NaN) LSE elements"
    err = (out.float() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"{label}: max error {err:.3e} > tolerance {tol:.3e}"
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), inf_ref), f"{label}: +inf LSE rows differ"
    fin = ~inf_ref
    if fin.any():
        # Relative to max(|lse|, 1): a row with one visible key has lse = its logit, which can sit near 0.
        rel = ((lse[fin] - ref_lse[fin]).abs() / ref_lse[fin].abs().clamp_min(1.0)).max().item()
        assert rel <= 1e-3, f"{label}: LSE relative error {rel:.3e}"
    return err


def pytest_generate_tests(metafunc):
    if "case_dtype" in metafunc.fixturenames:
        try:
            from flashserve import _C
            cfg = _C.compiled_configs()
            dts = {"float16": torch.float16, "bfloat16": torch.bfloat16}
            dtypes = [dts[x] for x in cfg["dtypes"]]
            dims = list(cfg["head_dims"]) + [d for d in (40, 100, 72, 180, 250) if hd_class(d) in cfg["head_dims"]]
        except Exception:  # not built: the conftest marks everything skipped
            dtypes, dims = [torch.bfloat16], [128]
        metafunc.parametrize("case_dtype", dtypes, ids=lambda x: str(x).split(".")[-1])
        metafunc.parametrize("case_d", dims)


# Varlen batch with lengths 1, 17, 128, 1000, 4097 and an empty sequence.
Q_LENS = [1, 17, 128, 0, 1000, 4097, 300]
K_LENS = [1, 17, 128, 0, 1000, 4097, 300]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [1, 5])
def test_varlen(fs_C, case_dtype, case_d, causal, splits):
    h, hk = 4, 2  # GQA
    q, k, v = rand_inputs(Q_LENS, K_LENS, h, hk, case_d, case_dtype, 1000 + case_d)
    scale = case_d ** -0.5
    out, lse, _ = run_fwd(fs_C, q, k, v, Q_LENS, K_LENS, scale, causal=causal, num_splits=splits)
    ref_out, ref_lse, _ = reference(q, k, v, Q_LENS, K_LENS, scale, causal=causal)
    base = sdpa_flash_error(q, k, v, Q_LENS, K_LENS, scale, causal=causal)
    check(out, lse, ref_out, ref_lse, 2 * base + 1e-5, f"varlen d={case_d} causal={causal} splits={splits}")


# seqlen_q != seqlen_k (bottom-right causal), MQA, windows, auto split.
@pytest.mark.parametrize("causal,wl,wr", [(False, -1, -1), (True, -1, -1), (False, 64, 32), (True, 100, -1),
                                          (False, 0, 0)])
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_uneven_and_window(fs_C, compiled, causal, wl, wr, splits):
    q_lens = [17, 128, 1, 500, 0, 300, 700]
    k_lens = [300, 128, 1000, 0, 64, 1, 2000]
    for dtype in compiled["dtypes"]:
        for d in (compiled["head_dims"][0], compiled["head_dims"][-1]):
            q, k, v = rand_inputs(q_lens, k_lens, 6, 1, d, dtype, 7 + d)
            scale = 0.7 / math.sqrt(d)
            out, lse, _ = run_fwd(fs_C, q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr,
                                  num_splits=splits)
            ref_out, ref_lse, _ = reference(q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr)
            base = sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr)
            check(out, lse, ref_out, ref_lse, 2 * base + 1e-5,
                  f"uneven {dtype} d={d} causal={causal} w=({wl},{wr}) splits={splits}")


@pytest.mark.parametrize("feature", ["softcap", "alibi_h", "alibi_bh", "softcap_alibi_window"])
@pytest.mark.parametrize("splits", [1, 4])
def test_softcap_alibi(fs_C, compiled, feature, splits):
    q_lens = [33, 1000, 0, 513]
    k_lens = [33, 1500, 7, 513]
    h, hk = 8, 2
    for dtype in compiled["dtypes"]:
        for d in (compiled["head_dims"][0], compiled["head_dims"][-1]):
            if "alibi" in feature:
                d = min(d, 248)  # the SDPA baseline carries ALiBi in 2 extra head-dim columns (<= 256 in all)
            q, k, v = rand_inputs(q_lens, k_lens, h, hk, d, dtype, 99 + d)
            scale = d ** -0.5
            kw = {}
            if "softcap" in feature:
                kw["softcap"] = 5.0
            if feature == "alibi_h" or feature == "softcap_alibi_window":
                kw["alibi"] = seeded_slopes(h)
            if feature == "alibi_bh":
                kw["alibi"] = seeded_slopes(len(q_lens), h)
            causal = feature != "softcap"
            if feature == "softcap_alibi_window":
                kw.update(wl=50, wr=10)
                causal = False
            out, lse, _ = run_fwd(fs_C, q, k, v, q_lens, k_lens, scale, causal=causal, num_splits=splits, **kw)
            ref_out, ref_lse, probs = reference(q, k, v, q_lens, k_lens, scale, causal=causal, **kw)
            base = sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=causal, wl=kw.get("wl", -1),
                                    wr=kw.get("wr", -1), alibi=kw.get("alibi"))
            if "softcap" in kw:
                base = max(base, p_rounding_error(ref_out, probs, v, q_lens, k_lens, dtype))
            check(out, lse, ref_out, ref_lse, 2 * base + 1e-5, f"{feature} {dtype} d={d} splits={splits}")


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap_alibi"])
@pytest.mark.parametrize("splits", [0, 4, 1])
def test_decode_split(fs_C, compiled, feature, splits):
    """Split-KV calls with at most 64 queries per sequence take the 64-row decode tile (FwdDecodeTraits):
    every head-dim class and dtype, short queries against long keys (and an empty and a 5-key sequence)."""
    q_lens = [1, 64, 17, 0, 33, 2]
    k_lens = [3000, 2048, 1000, 7, 4097, 5]
    h, hk = 8, 2
    kw = {"causal": feature == "causal"}
    if feature == "window":
        kw.update(wl=300, wr=0)
    if feature == "softcap_alibi":
        kw.update(softcap=5.0, alibi=seeded_slopes(h))
    for dtype in compiled["dtypes"]:
        for d in compiled["head_dims"]:
            if "alibi" in kw:
                d = min(d, 248)  # the SDPA baseline carries ALiBi in 2 extra head-dim columns
            q, k, v = rand_inputs(q_lens, k_lens, h, hk, d, dtype, 500 + d)
            scale = d ** -0.5
            out, lse, _ = run_fwd(fs_C, q, k, v, q_lens, k_lens, scale, num_splits=splits, **kw)
            ref_out, ref_lse, probs = reference(q, k, v, q_lens, k_lens, scale, **kw)
            base = sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=kw["causal"], wl=kw.get("wl", -1),
                                    wr=kw.get("wr", -1), alibi=kw.get("alibi"))
            if "softcap" in kw:
                base = max(base, p_rounding_error(ref_out, probs, v, q_lens, k_lens, dtype))
            check(out, lse, ref_out, ref_lse, 2 * base + 1e-5, f"decode {feature} {dtype} d={d} splits={splits}")


@pytest.mark.parametrize("causal,wl,wr", [(False, -1, -1), (True, -1, -1), (False, 100, 30)])
def test_hopper_and_mma_sync_paths(fs_C, compiled, monkeypatch, causal, wl, wr):
    """On an sm_90 GPU with a 90a build, calls without softcap/ALiBi/dropout/return_softmax/split-KV at head-dim
    classes 64/128/256 run the wgmma kernel (csrc/fwd/hopper/); FLASHSERVE_FWD_HOPPER=0 forces the mma.sync
    kernel. Both paths must meet the bar on the same inputs, including d=120 (class 128, zero-padded columns)."""
    q_lens = [1, 17, 128, 0, 1000, 300, 129]
    k_lens = [1, 40, 128, 5, 1000, 0, 700]
    dims = [d for d in (64, 120, 128, 256) if hd_class(d) in compiled["head_dims"]]
    if not dims:
        pytest.skip("no Hopper head-dim class in this build")
    for dtype in compiled["dtypes"]:
        for d in dims:
            q, k, v = rand_inputs(q_lens, k_lens, 4, 2, d, dtype, 31 + d)
            scale = d ** -0.5
            ref_out, ref_lse, _ = reference(q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr)
            base = sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr)
            outs = {}
            for path in ("1", "0"):
                monkeypatch.setenv("FLASHSERVE_FWD_HOPPER", path)
                out, lse, _ = run_fwd(fs_C, q, k, v, q_lens, k_lens, scale, causal=causal, wl=wl, wr=wr)
                check(out, lse, ref_out, ref_lse, 2 * base + 1e-5,
                      f"hopper={path} {dtype} d={d} causal={causal} w=({wl},{wr})")
                outs[path] = out.float()
            # Same math, different tiles: the two paths differ by rounding only.
            assert (outs["1"] - outs["0"]).abs().max().item() <= 2 * base + 1e-5


def test_odd_head_dim_noncontiguous(fs_C, compiled):
    """Head dim not a multiple of 8 (padded) and q/k/v views of a packed qkv tensor."""
    d = 20 if 32 in compiled["head_dims"] else 60
    if hd_class(d) not in compiled["head_dims"]:
        pytest.skip("no class for the odd head dim in this build")
    dtype = compiled["dtypes"][0]
    lens = [5, 200, 64]
    qkv = torch.randn(sum(lens), 3, 4, d, device=DEV, dtype=dtype)
    q, k, v = qkv.unbind(1)
    out, lse, _ = run_fwd(fs_C, q, k, v, lens, lens, d ** -0.5, causal=True)
    ref_out, ref_lse, _ = reference(q, k, v, lens, lens, d ** -0.5, causal=True)
    base = sdpa_flash_error(q.contiguous(), k.contiguous(), v.contiguous(), lens, lens, d ** -0.5, causal=True)
    check(out, lse, ref_out, ref_lse, 2 * base + 1e-5, f"odd d={d}")


def test_bad_inputs(fs_C, compiled):
    dtype = compiled["dtypes"][0]
    q, k, v = rand_inputs([8], [8], 4, 4, 64, dtype, 1)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        run_fwd(fs_C, q.float(), k.float(), v.float(), [8], [8], 0.1)
    with pytest.raises(RuntimeError, match="multiple of heads"):
        q3, k3, v3 = rand_inputs([8], [8], 4, 3, 64, dtype, 1)
        run_fwd(fs_C, q3, k3, v3, [8], [8], 0.1)
    missing = [c for c in CLASSES if c not in compiled["head_dims"]]
    if missing:
        d = missing[0]
        q, k, v = rand_inputs([8], [8], 2, 2, d, dtype, 1)
        with pytest.raises(RuntimeError, match="no kernel compiled"):
            run_fwd(fs_C, q, k, v, [8], [8], 0.1)


# ---------------------------------------------------------------- dropout

M32 = 0xFFFFFFFF


def philox_keep(seed, offset, seq_head, rows, cols, p_drop):
    """numpy Philox4x32-10 per csrc/common/dropout.cuh: keep mask (len(rows), len(cols))."""
    r = np.asarray(rows, dtype=np.uint64)[:, None]
    c = np.asarray(cols, dtype=np.uint64)[None, :]
    shape = np.broadcast_shapes(r.shape, c.shape)
    c0 = np.broadcast_to(c // 4, shape).astype(np.uint64)
    c1 = np.broadcast_to(r, shape).astype(np.uint64)
    c2 = np.full(shape, seq_head, dtype=np.uint64)
    c3 = np.full(shape, offset & M32, dtype=np.uint64)
    k0, k1 = np.uint64(seed & M32), np.uint64((seed >> 32) & M32)
    for rnd in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(M32),
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(M32))
        if rnd < 9:
            k0 = np.uint64((int(k0) + 0x9E3779B9) & M32)
            k1 = np.uint64((int(k1) + 0xBB67AE85) & M32)
    outs = np.stack([c0, c1, c2, c3])
    comp = np.broadcast_to(c % 4, shape).astype(np.int64)
    val = np.take_along_axis(outs, comp[None], axis=0)[0]
    t = (1.0 - p_drop) * 4294967296.0
    thr = 0xFFFFFFFF if t >= 4294967295.0 else int(t)
    return val < thr


def test_dropout_fraction_and_reproducible(fs_C, compiled):
    dtype, d = compiled["dtypes"][0], compiled["head_dims"][0]
    lens, h, p = [1024, 1024], 8, 0.17
    q, k, v = rand_inputs(lens, lens, h, h, d, dtype, 5)
    o1, l1, s1 = run_fwd(fs_C, q, k, v, lens, lens, d ** -0.5, p_drop=p, seed=1234, offset=77,
                         return_softmax=True)
    o2, l2, s2 = run_fwd(fs_C, q, k, v, lens, lens, d ** -0.5, p_drop=p, seed=1234, offset=77,
                         return_softmax=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(l1, l2), "same seed/offset must repeat"
    valid = s1[:, :, :1024, :1024]
    assert not torch.isnan(valid).any()
    keep = (~torch.signbit(valid)).float().mean().item()
    assert abs(keep - (1 - p)) <= 0.01, f"kept fraction {keep:.4f} vs {1 - p:.4f}"
    o3, _, s3 = run_fwd(fs_C, q, k, v, lens, lens, d ** -0.5, p_drop=p, seed=1234, offset=78, return_softmax=True)
    assert not torch.equal(torch.signbit(s3), torch.signbit(s1)), "a new offset must change the mask"
    # Without return_softmax the output is the same (the mask does not depend on it).
    o4, l4, s4 = run_fwd(fs_C, q, k, v, lens, lens, d ** -0.5, p_drop=p, seed=1234, offset=77)
    assert s4 is None and torch.equal(o4, o1) and torch.equal(l4, l1)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_and_philox(fs_C, compiled, causal):
    q_lens, k_lens, h, hk, p = [70, 0, 300, 129], [70, 5, 200, 400], 4, 2, 0.3
    seed, offset = (1 << 40) + 987654321, 3 << 33 | 5
    for dtype in compiled["dtypes"]:
        d = compiled["head_dims"][-1]
        q, k, v = rand_inputs(q_lens, k_lens, h, hk, d, dtype, 11)
        scale = d ** -0.5
        out, lse, s = run_fwd(fs_C, q, k, v, q_lens, k_lens, scale, causal=causal, p_drop=p, seed=seed,
                              offset=offset, return_softmax=True)
        keep = [~torch.signbit(s[b]) for b in range(len(q_lens))]
        ref_out, ref_lse, probs = reference(q, k, v, q_lens, k_lens, scale, causal=causal, keep=keep, p_drop=p)
        base = sdpa_flash_error(q, k, v, q_lens, k_lens, scale, causal=causal) / (1 - p)
        check(out, lse, ref_out, ref_lse, 2 * base + 1e-5, f"dropout {dtype} causal={causal}")
        for b, (sq, sk) in enumerate(zip(q_lens, k_lens)):
            if sq == 0:
                continue
            sd = s[b, :, :sq, :sk].float()
            assert not torch.isnan(sd).any()
            torch.testing.assert_close(sd.abs(), probs[b], rtol=2e-2, atol=2e-3)
            # Bit-exact mask against the documented Philox counter, where the probability is nonzero.
            for hh in range(h):
                want = philox_keep(seed, offset, b * h + hh, range(sq), range(sk), p)
                got = keep[b][hh, :sq, :sk].cpu().numpy()
                nz = probs[b][hh].cpu().numpy() > 0
                assert np.array_equal(got[nz], want[nz]), f"mask differs from Philox (b={b}, h={hh})"


# ---------------------------------------------------------------- sanitizer


def sanitize_cases():
    """One small case of each kernel: fast, full (features + dropout + return_softmax), split + combine, the Hopper
    kernels, the decode tile."""
    from flashserve import _C

    cfg = _C.compiled_configs()
    dts = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype, d = dts[cfg["dtypes"][0]], cfg["head_dims"][0]
    q_lens, k_lens = [3, 130, 0], [70, 129, 9]
    q, k, v = rand_inputs(q_lens, k_lens, 2, 1, d, dtype, 3)
    run_fwd(_C, q, k, v, q_lens, k_lens, 0.1, causal=True)
    run_fwd(_C, q, k, v, q_lens, k_lens, 0.1, causal=True, softcap=3.0, alibi=torch.rand(2, device=DEV),
            p_drop=0.2, seed=3, offset=4, return_softmax=True)
    run_fwd(_C, q, k, v, q_lens, k_lens, 0.1, wl=20, wr=5, num_splits=3)
    run_fwd(_C, q, k, v, q_lens, k_lens, 0.1, softcap=2.0, num_splits=2)
    # The Hopper kernels (sm_90 with a 90a build): the two-warpgroup kernel at class 64, the warp-specialised
    # one at 128 and 256; elsewhere these calls take the mma.sync kernels again.
    for hd in (64, 128, 256):
        if hd in cfg["head_dims"]:
            qh, kh, vh = rand_inputs(q_lens, k_lens, 2, 1, hd, dtype, 5)
            run_fwd(_C, qh, kh, vh, q_lens, k_lens, 0.1, causal=True)
            run_fwd(_C, qh, kh, vh, q_lens, k_lens, 0.1, wl=20, wr=5)
    # The 64-row decode tile: split-KV with at most 64 queries per sequence.
    dq_lens, dk_lens = [1, 40, 0], [300, 129, 9]
    qd, kd, vd = rand_inputs(dq_lens, dk_lens, 2, 1, d, dtype, 6)
    run_fwd(_C, qd, kd, vd, dq_lens, dk_lens, 0.1, causal=True, num_splits=3)
    print("sanitize cases done")


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", sys.executable, os.path.abspath(__file__),
           "--sanitize"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"compute-sanitizer {tool} failed (rc={r.returncode}):\n{tail}"
    assert "sanitize cases done" in r.stdout, tail
    assert "ERROR SUMMARY: 0 errors" in (r.stdout + r.stderr) or "RACECHECK SUMMARY: 0 hazards" in (
        r.stdout + r.stderr), tail


if __name__ == "__main__":
    if "--sanitize" in sys.argv:
        sanitize_cases()
