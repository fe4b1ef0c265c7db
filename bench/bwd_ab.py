"""A/B of backward-kernel options that plan() reads from the environment at each call (FLASHSERVE_BWD_LOOP,
FLASHSERVE_BWD_DET_MODE, ...): every variant on every row, in one process, rounds taken in turn, beside torch SDPA
FLASH's backward on the same inputs.

  python bench/bwd_ab.py --variants "base;loop:FLASHSERVE_BWD_LOOP=auto" [--rows 128:1024:1,...] [--det]

A variant is NAME or NAME:VAR=VALUE,VAR=VALUE. Rows are head_dim:seqlen:causal (16k tokens per launch, heads =
2048 / head dim, bench/kernels.py's grid). TFLOP/s = 2.5 x the forward FLOPs / time; time = median over rounds of
CUDA-event time of --reps back-to-back calls.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROWS = ("64:1024:1,64:2048:1,64:4096:1,64:1024:0,64:4096:0,128:1024:1,128:2048:1,128:4096:1,128:8192:1,"
        "128:1024:0,128:4096:0,256:1024:1,256:2048:1,256:4096:1,256:1024:0,256:4096:0")


def parse_variants(text):
    out = []
    for item in text.split(";"):
        name, _, env = item.partition(":")
        pairs = dict(kv.split("=", 1) for kv in env.split(",") if kv)
        out.append((name, pairs))
    return out


def bwd_row(C, dtype, d, s, causal, device="cuda"):
    """One row of the grid (16k tokens, heads = 2048 / d): (ours(det) -> our backward call, fa2 -> SDPA FLASH's
    backward on the same inputs, flops = 2.5 x the forward's, batch, heads). O and LSE come from our forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h = 16384 // s, 2048 // d
    q, k, v, do = (torch.randn(b * s, h, d, device=device, dtype=dtype) for _ in range(4))
    cu = torch.arange(0, (b + 1) * s, s, device=device, dtype=torch.int32)
    out, lse, _ = C.fwd(q, k, v, cu, cu, s, s, d ** -0.5, causal, -1, -1, 0.0, None, 0.0, 0, 0, False, 0)

    def ours(det):
        return lambda: C.bwd(do, q, k, v, out, lse, cu, cu, s, s, d ** -0.5, causal, -1, -1, 0.0, None, 0.0, 0, 0,
                             det)

    qs, ks, vs = (x.view(b, s, h, d).transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    dob = do.view(b, s, h, d).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    fa2 = lambda: torch.autograd.grad(o, (qs, ks, vs), dob, retain_graph=True)  # noqa: E731
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    return ours, fa2, flops, b, h


def event_time(fn, reps):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3 / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--det", action="store_true", help="deterministic=True for our calls")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    from flashserve import _C

    variants = parse_variants(args.variants)
    keys = sorted({k for _, env in variants for k in env})
    dtype = getattr(torch, args.dtype)
    lines = [f"# Backward A/B ({datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{args.dtype}, deterministic={args.det}, {args.rounds} rounds x {args.reps} calls, turns taken)", "",
             "Variants: " + "; ".join(f"{n} = {env or 'defaults'}" for n, env in variants), "",
             "| row | " + " | ".join(n for n, _ in variants) + " | FA2 | " +
             " | ".join(f"{n}/{variants[0][0]}" for n, _ in variants[1:]) + " | " +
             " | ".join(f"{n}/FA2" for n, _ in variants) + " |",
             "| --- |" + " ---: |" * (2 * len(variants) + len(variants))]
    print("\n".join(lines), flush=True)
    for spec in args.rows.split(","):
        d, s, causal = (int(x) for x in spec.split(":"))
        causal = bool(causal)
        ours_for, fa2, flops, b, h = bwd_row(_C, dtype, d, s, causal)
        ours = ours_for(args.det)
        calls = [(name, env, ours) for name, env in variants] + [("FA2", {}, fa2)]
        times = {name: [] for name, _, _ in calls}
        for r in range(args.rounds + 1):  # round 0: warm-up
            for name, env, fn in calls:
                for key in keys:
                    os.environ.pop(key, None)
                os.environ.update(env)
                t = event_time(fn, args.reps if r else 2)
                if r:
                    times[name].append(t)
        for key in keys:
            os.environ.pop(key, None)
        tf = {name: flops / statistics.median(ts) / 1e12 for name, ts in times.items()}
        base = variants[0][0]
        row = (f"| d{d} {s // 1024}k {'causal' if causal else 'dense'} | " +
               " | ".join(f"{tf[n]:.1f}" for n, _ in variants) + f" | {tf['FA2']:.1f} | " +
               " | ".join(f"{tf[n] / tf[base]:.3f}" for n, _ in variants[1:]) + " | " +
               " | ".join(f"{tf[n] / tf['FA2']:.3f}" for n, _ in variants) + " |")
        lines.append(row)
        print(row, flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
