"""Kernel benchmark: flashserve._C.fwd vs torch SDPA (FLASH_ATTENTION and CUDNN_ATTENTION), same run.

Rows (issue 3): bf16 and fp16, head dims 64/128/256, seqlen 512..16k with 16k tokens per launch
(batch = 16384 / seqlen, heads = 2048 / head_dim), causal and not; a varlen row (mixed lengths, 16k
tokens); split-KV rows (batch 1, 8 heads, 32k keys, 1 and 128 queries, head dim 128).
TFLOP/s = 4*B*H*Sq*Sk*D / time (halved for causal); time = median over 5 rounds of --reps back-to-back
calls between CUDA events, after warm-up.

  python bench/kernels.py [--quick] [--json out.json] [--md out.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def timed(fn, reps, warmup=3, rounds=5):
    """Seconds per call: `rounds` times, `reps` back-to-back calls between two CUDA events (the queue stays
    full, so host launch overhead hides behind the kernels, as in a real model); median of the rounds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    return statistics.median(times)


def sdpa_time(backend, q, k, v, causal, reps):
    """q/k/v in (B, H, S, D). None where the backend refuses the shape."""
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel(backend):
            return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
    except RuntimeError:
        return None


def fwd_call(C, q, k, v, cu_q, cu_k, mq, mk, causal, num_splits=0):
    d = q.shape[-1]
    return lambda: C.fwd(q, k, v, cu_q, cu_k, mq, mk, d ** -0.5, causal, -1, -1, 0.0, None, 0.0, 0, 0, False,
                         num_splits)


def tflops(flops, t):
    return None if t is None else flops / t / 1e12


def dense_row(C, dtype, d, s, causal, reps):
    from torch.nn.attention import SDPBackend

    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b * s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.arange(0, (b + 1) * s, s, device="cuda", dtype=torch.int32)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    t_ours = timed(fwd_call(C, q, k, v, cu, cu, s, s, causal), reps)
    qb, kb, vb = (x.view(b, s, h, d).transpose(1, 2) for x in (q, k, v))
    t_fa = sdpa_time(SDPBackend.FLASH_ATTENTION, qb, kb, vb, causal, reps)
    t_cu = sdpa_time(SDPBackend.CUDNN_ATTENTION, qb, kb, vb, causal, reps)
    return dict(op="fwd", kind="dense", dtype=str(dtype).split(".")[-1], head_dim=d, batch=b, heads=h, seqlen_q=s,
                seqlen_k=s, causal=causal, ours_ms=t_ours * 1e3, ours_tflops=tflops(flops, t_ours),
                sdpa_flash_tflops=tflops(flops, t_fa), sdpa_cudnn_tflops=tflops(flops, t_cu))


def varlen_row(C, dtype, d, causal, reps):
    lens = [4096, 3000, 2048, 1500, 1024, 1024, 800, 700, 512, 512, 400, 300, 200, 150, 100, 18]
    h = 2048 // d
    tot = sum(lens)
    q, k, v = (torch.randn(tot, h, d, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device="cuda", dtype=torch.int32)
    flops = sum(4 * h * s * s * d / (2 if causal else 1) for s in lens)
    t = timed(fwd_call(C, q, k, v, cu, cu, max(lens), max(lens), causal), reps)
    return dict(op="fwd", kind="varlen", dtype=str(dtype).split(".")[-1], head_dim=d, batch=len(lens), heads=h,
                seqlen_q=max(lens), seqlen_k=max(lens), causal=causal, total_tokens=tot, ours_ms=t * 1e3,
                ours_tflops=tflops(flops, t), sdpa_flash_tflops=None, sdpa_cudnn_tflops=None,
                note="SDPA has no varlen path: null")


def split_row(C, dtype, sq, reps, sk=32768, h=8, d=128):
    from torch.nn.attention import SDPBackend

    q = torch.randn(sq, h, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(sk, h, d, device="cuda", dtype=dtype) for _ in range(2))
    cu_q = torch.tensor([0, sq], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, sk], device="cuda", dtype=torch.int32)
    flops = 4 * h * sq * sk * d
    kv_bytes = 2 * sk * h * d * q.element_size()
    t_auto = timed(fwd_call(C, q, k, v, cu_q, cu_k, sq, sk, False, 0), reps)
    t_one = timed(fwd_call(C, q, k, v, cu_q, cu_k, sq, sk, False, 1), reps)
    qb, kb, vb = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    t_fa = sdpa_time(SDPBackend.FLASH_ATTENTION, qb, kb, vb, False, reps)
    t_cu = sdpa_time(SDPBackend.CUDNN_ATTENTION, qb, kb, vb, False, reps)
    us = lambda t: None if t is None else t * 1e6
    return dict(op="fwd", kind="splitkv", dtype=str(dtype).split(".")[-1], head_dim=d, batch=1, heads=h,
                seqlen_q=sq, seqlen_k=sk, causal=False, ours_tflops=tflops(flops, t_auto),
                sdpa_flash_tflops=tflops(flops, t_fa), sdpa_cudnn_tflops=tflops(flops, t_cu),
                ours_us=us(t_auto), ours_nosplit_us=us(t_one), sdpa_flash_us=us(t_fa), sdpa_cudnn_us=us(t_cu),
                ours_kv_tbps=kv_bytes / t_auto / 1e12)


# ---- backward rows (csrc/bwd/) ----
def sdpa_bwd_time(backend, q, k, v, do, causal, reps):
    """Backward only: autograd.grad through one recorded SDPA forward. None where the backend refuses."""
    from torch.nn.attention import sdpa_kernel

    try:
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        return timed(lambda: torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True), reps)
    except RuntimeError:
        return None


def dense_bwd_row(C, dtype, d, s, causal, reps):
    """Backward TFLOP/s = 2.5 x the forward FLOPs / time; O and LSE from our forward; also deterministic mode."""
    from torch.nn.attention import SDPBackend

    b, h = 16384 // s, 2048 // d
    q, k, v, do = (torch.randn(b * s, h, d, device="cuda", dtype=dtype) for _ in range(4))
    cu = torch.arange(0, (b + 1) * s, s, device="cuda", dtype=torch.int32)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    out, lse, _ = fwd_call(C, q, k, v, cu, cu, s, s, causal)()

    def ours(det):
        return lambda: C.bwd(do, q, k, v, out, lse, cu, cu, s, s, d ** -0.5, causal, -1, -1, 0.0, None, 0.0, 0, 0,
                             det)

    t_ours, t_det = timed(ours(False), reps), timed(ours(True), reps)
    qb, kb, vb, dob = (x.view(b, s, h, d).transpose(1, 2) for x in (q, k, v, do))
    t_fa = sdpa_bwd_time(SDPBackend.FLASH_ATTENTION, qb, kb, vb, dob, causal, reps)
    t_cu = sdpa_bwd_time(SDPBackend.CUDNN_ATTENTION, qb, kb, vb, dob, causal, reps)
    return dict(op="bwd", kind="dense", dtype=str(dtype).split(".")[-1], head_dim=d, batch=b, heads=h, seqlen_q=s,
                seqlen_k=s, causal=causal, ours_ms=t_ours * 1e3, ours_tflops=tflops(flops, t_ours),
                ours_deterministic_tflops=tflops(flops, t_det), sdpa_flash_tflops=tflops(flops, t_fa),
                sdpa_cudnn_tflops=tflops(flops, t_cu))


def fmt(x, w=6, p=0):
    return " " * (w - 1) + "-" if x is None else f"{x:{w}.{p}f}"


def table(rows):
    out = ["| kind | dtype | hd | B | H | Sq | Sk | causal | ours TF/s | FA2 TF/s | cuDNN TF/s | ours/FA2 | ours/cuDNN |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ra = r["ours_tflops"] / r["sdpa_flash_tflops"] if r.get("sdpa_flash_tflops") else None
        rc = r["ours_tflops"] / r["sdpa_cudnn_tflops"] if r.get("sdpa_cudnn_tflops") else None
        extra = ""
        if r["kind"] == "splitkv":
            extra = (f" ({r['ours_us']:.0f} us, no-split {r['ours_nosplit_us']:.0f} us, FA2 "
                     f"{fmt(r['sdpa_flash_us'], 1)} us, cuDNN {fmt(r['sdpa_cudnn_us'], 1)} us)")
        if r.get("ours_deterministic_tflops"):
            extra = f" (deterministic {r['ours_deterministic_tflops']:.1f})"
        out.append(f"| {r.get('op', 'fwd')} {r['kind']} | {r['dtype']} | {r['head_dim']} | {r['batch']} | {r['heads']} | {r['seqlen_q']} | "
                   f"{r['seqlen_k']} | {'y' if r['causal'] else 'n'} | {fmt(r['ours_tflops'], 1, 1)}{extra} | "
                   f"{fmt(r['sdpa_flash_tflops'], 1, 1)} | {fmt(r['sdpa_cudnn_tflops'], 1, 1)} | {fmt(ra, 1, 2)} | "
                   f"{fmt(rc, 1, 2)} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="bf16 only, fewer seqlens")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--reps", type=int, default=10, help="back-to-back calls per timed round (5 rounds)")
    ap.add_argument("--ops", default="fwd,bwd", help="fwd and/or bwd rows (bwd needs _C.bwd)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    from flashserve import _C

    cfg = _C.compiled_configs()
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16}
    names = {"bf16": "bfloat16", "fp16": "float16"}
    dtypes = [x for x in a.dtypes.split(",") if names[x] in cfg["dtypes"]]
    if a.quick:
        dtypes = dtypes[:1]
    classes = (32, 64, 96, 128, 192, 256)
    hds = [int(x) for x in a.head_dims.split(",")
           if next(c for c in classes if int(x) <= c) in cfg["head_dims"]]
    seqlens = [int(x) for x in a.seqlens.split(",")]
    if a.quick:
        seqlens = [s for s in seqlens if s in (1024, 4096, 16384)]
    rows = []
    torch.manual_seed(0)
    for dt in dtypes:
        for d in hds:
            for s in seqlens:
                for causal in (False, True):
                    if "fwd" in a.ops.split(","):
                        rows.append(dense_row(_C, dts[dt], d, s, causal, a.reps))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    if "bwd" in a.ops.split(",") and hasattr(_C, "bwd"):
                        rows.append(dense_bwd_row(_C, dts[dt], d, s, causal, a.reps))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    dt0 = dts[dtypes[0]] if dtypes else torch.bfloat16
    if next(c for c in classes if 128 <= c) in cfg["head_dims"] and dtypes and "fwd" in a.ops.split(","):
        for causal in (False, True):
            rows.append(varlen_row(_C, dt0, 128, causal, a.reps))
        for sq in (1, 128):
            rows.append(split_row(_C, dt0, sq, a.reps))
    props = torch.cuda.get_device_properties(0)
    meta = dict(date=datetime.date.today().isoformat(), gpu=props.name, sms=props.multi_processor_count,
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                compiled=cfg, reps=a.reps, timing="median over 5 rounds of (CUDA-event time of --reps back-to-back calls / reps), after 3 warm-ups")
    md = (f"# Attention kernels vs torch SDPA ({meta['date']}, {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, "
          f"cuDNN {meta['cudnn']})\n\n" + table(rows) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
