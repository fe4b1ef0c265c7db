"""Forward tile sweep for a tuning build (FLASHSERVE_NVCC_FLAGS=-DFS_TUNE, see csrc/fwd/fwd_kernel.cuh):
times each candidate tile (FLASHSERVE_FWD_TILE=<BM>x<BN>x<NW>, read at every launch) against the default
tile and SDPA FLASH (FA2) in one process, same inputs, and checks each candidate's output and LSE against
the default kernel's (bitwise-close expected: only the tile changes the summation order). Dense rows as in
bench/kernels.py (16k tokens per launch, heads = 2048 / d).

  python bench/tune_fwd_tiles.py --rows 256:1024:n,256:4096:y --tiles 256=64x64x4,128x32x8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import fwd_call, sdpa_time, tflops, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="d:seqlen:causal(y/n),...")
    ap.add_argument("--tiles", required=True, help="d=BMxBNxNW,BMxBNxNW;d=...")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    from flashserve import _C
    from torch.nn.attention import SDPBackend

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    tiles = {int(k): v.split(",") for k, v in (x.split("=") for x in a.tiles.split(";"))}
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} cuda {torch.version.cuda} {a.dtype}")
    print("| d | S | causal | FA2 TF/s | default TF/s (x FA2) | " + " | ".join(f"{t}" for t in sorted({t for v in tiles.values() for t in v})) + " |")
    for row in a.rows.split(","):
        d, s, c = row.split(":")
        d, s, causal = int(d), int(s), c == "y"
        torch.manual_seed(0)
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b * s, h, d, device="cuda", dtype=dtype) for _ in range(3))
        cu = torch.arange(0, (b + 1) * s, s, device="cuda", dtype=torch.int32)
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        fn = fwd_call(_C, q, k, v, cu, cu, s, s, causal)
        os.environ.pop("FLASHSERVE_FWD_TILE", None)
        ref = fn()
        ref_o, ref_lse = (ref[0].float().clone(), ref[1].float().clone())
        qb, kb, vb = (x.view(b, s, h, d).transpose(1, 2) for x in (q, k, v))
        t_fa = sdpa_time(SDPBackend.FLASH_ATTENTION, qb, kb, vb, causal, a.reps)
        cands = [None] + tiles.get(d, [])
        best = {}
        for _ in range(2):  # two alternating passes, best of both per candidate
            for t in cands:
                if t is None:
                    os.environ.pop("FLASHSERVE_FWD_TILE", None)
                else:
                    os.environ["FLASHSERVE_FWD_TILE"] = t
                tt = timed(fn, a.reps)
                best[t] = min(best.get(t, 1e9), tt)
        errs = {}
        for t in cands[1:]:
            os.environ["FLASHSERVE_FWD_TILE"] = t
            o = fn()
            eo = (o[0].float() - ref_o).abs().max().item()
            el = (o[1].float() - ref_lse).abs().max().item()
            nan = bool(torch.isnan(o[0]).any().item())
            errs[t] = (eo, el, nan)
        os.environ.pop("FLASHSERVE_FWD_TILE", None)
        fa = tflops(flops, t_fa)
        base = tflops(flops, best[None])
        cells = []
        for t in sorted({t for v in tiles.values() for t in v}):
            if t not in best:
                cells.append("-")
                continue
            tf = tflops(flops, best[t])
            eo, el, nan = errs[t]
            cells.append(f"{tf:.1f} ({tf / fa:.2f}x, {tf / base:.2f} of default; dO {eo:.1e} dLSE {el:.1e}{' NaN' if nan else ''})")
        print(f"| {d} | {s} | {'y' if causal else 'n'} | {fa:.1f} | {base:.1f} ({base / fa:.2f}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
