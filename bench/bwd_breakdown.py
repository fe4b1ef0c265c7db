"""Where a backward launch's GPU time goes: per-kernel device time (torch.profiler, CUPTI) of our backward
(default and deterministic) and of torch SDPA FLASH's backward on the same rows, so the share of the small
preprocess / postprocess kernels beside the main kernel is visible for both.

  python bench/bwd_breakdown.py [--rows 64:1024:1,128:1024:1,...] [--dtype bfloat16] [--calls 20] [--md out.md]

Rows are head_dim:seqlen:causal with 16k tokens per launch and heads = 2048 / head dim (bench/kernels.py's grid).
Times are microseconds per call, summed over the kernels of one name, averaged over --calls calls after warm-up.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bwd_ab import bwd_row  # noqa: E402 - bench/bwd_ab.py: the grid's rows

DEFAULT_ROWS = ("64:1024:1,64:2048:1,64:1024:0,64:8192:0,128:1024:1,128:2048:1,128:8192:0,128:8192:1,"
                "256:1024:0,256:1024:1,256:2048:1,256:8192:1,256:16384:0")


def kernel_times(fn, calls):
    """{kernel name: device microseconds per call} over `calls` calls of fn."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time / calls if hasattr(ev, "device_time") else ev.cuda_time / calls
    return dict(per)


def short(name, width=70):
    """Kernel name without its argument list, namespaces shortened."""
    name = name.split("(const ")[0].split("(flashserve")[0].replace("(anonymous namespace)::", "")
    name = name.replace("flashserve::bwd::", "").replace("pytorch_flash::", "").replace("void ", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--md", default=None)
    ap.add_argument("--det-modes", default="auto,own,counters",
                    help="deterministic schemes to time (FLASHSERVE_BWD_DET_MODE; auto = plan()'s rule)")
    args = ap.parse_args()
    from flashserve import _C

    dtype = getattr(torch, args.dtype)
    lines = [f"# Backward per-kernel device time ({datetime.date.today()}, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, {args.dtype}, {args.calls} calls each)", ""]
    for spec in args.rows.split(","):
        d, s, causal = (int(x) for x in spec.split(":"))
        causal = bool(causal)
        torch.manual_seed(0)
        ours, fa2, _, b, h = bwd_row(_C, dtype, d, s, causal)
        first = len(lines)
        lines += [f"## d{d} {s // 1024}k {'causal' if causal else 'dense'} (B={b}, H={h})", "",
                  "| call | kernel | us/call |", "| --- | --- | ---: |"]
        calls = [("ours", None, ours(False))]
        calls += [(f"ours det {m}", m, ours(True)) for m in args.det_modes.split(",") if m]
        calls.append(("FA2", None, fa2))
        for label, mode, fn in calls:
            os.environ.pop("FLASHSERVE_BWD_DET_MODE", None)
            if mode and mode != "auto":
                os.environ["FLASHSERVE_BWD_DET_MODE"] = mode
            times = kernel_times(fn, args.calls)
            total = sum(times.values())
            for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {label} | {short(name)} | {us:.1f} |")
            lines.append(f"| {label} | **total** | **{total:.1f}** |")
        lines.append("")
        print("\n".join(lines[first:]), flush=True)
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
