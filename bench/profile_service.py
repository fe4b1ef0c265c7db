"""Where a server's CPU goes under many small requests: per-thread CPU time and a profile of the event loop.

    python bench/profile_service.py [--device cuda] [--batch-tokens 32768,0] [--requests 2048]

Starts an in-process server (the best backend on this machine, shared memory allowed), drives it with
`flashserve bench` (64 clients in 8 processes, forward, 512 tokens x 16 heads x 64, bf16, shm), and prints for
each setting: requests/s, server CPU ms per request split by thread (event loop, compute workers, copiers, gRPC
core threads), and the event loop's top functions by own time (cProfile)."""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import subprocess
import sys
import threading
import time

import torch

from flashserve.server import BackgroundServer, ServerConfig


def thread_cpu() -> dict:
    """native thread id -> (name, cpu seconds) for every thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[int(tid)] = (names.get(int(tid), f"[{comm}]"), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError):
            continue
    return out


def group(name: str) -> str:
    for prefix in ("flashserve-compute", "flashserve-copy", "flashserve-shm-copy", "flashserve-server"):
        if name.startswith(prefix):
            return prefix
    return name


LARGE_CLIENT = """
import sys, time, torch, flashserve
from flashserve.autograd import make_params
n = int(sys.argv[2]) * (1 << 20) // (256 * 2)
q = torch.randn(n, 1, 256).bfloat16(); k = torch.randn(16, 1, 256).bfloat16()
cu_q, cu_k = torch.tensor([0, n], dtype=torch.int32), torch.tensor([0, 16], dtype=torch.int32)
params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, n, 16, False)
with flashserve.Client(sys.argv[1], timeout=600, transport="bytes") as c:
    c.forward(q, k, k, cu_q, cu_k, params)
    print("ready", flush=True); sys.stdin.readline()
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter(); reply, _ = c.forward(q, k, k, cu_q, cu_k, params)
        print(f"round trip {(time.perf_counter() - t0) * 1e3:.1f} ms, server receive {reply.timings.receive_s * 1e3:.1f} "
              f"copy in {reply.timings.copy_in_s * 1e3:.2f} compute {reply.timings.compute_s * 1e3:.2f} "
              f"copy out {reply.timings.copy_out_s * 1e3:.2f}", flush=True)
"""


def large(args) -> int:
    cfg = ServerConfig(host="127.0.0.1", port=0, device=args.device, max_concurrent=256)
    reps = 5
    with BackgroundServer(cfg) as srv:
        client = subprocess.Popen([sys.executable, "-c", LARGE_CLIENT, srv.target, str(args.large_mb), str(reps)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        client.stdout.readline()
        prof = cProfile.Profile()
        srv._loop.call_soon_threadsafe(prof.enable)
        before = thread_cpu()
        client.stdin.write("go\n")
        client.stdin.flush()
        out = client.stdout.read()
        client.wait()
        after = thread_cpu()
        srv._loop.call_soon_threadsafe(prof.disable)
        time.sleep(0.5)
        print(f"=== {args.large_mb} MB q over gRPC chunks, backend {srv.service.backend.name}\n{out}")
        by = collections.Counter()
        for tid, (name, cpu) in after.items():
            by[group(name)] += cpu - before.get(tid, (name, 0.0))[1]
        print("server CPU ms per round trip by thread:")
        for name, cpu in by.most_common(12):
            if cpu > 0:
                print(f"   {cpu * 1e3 / reps:7.2f}  {name}")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))
    return 0


class NullComputeBackend:
    """Wraps a backend: outputs of the right shapes, no attention computed (isolates the service's own cost)."""

    def __init__(self, inner):
        self._inner = inner
        self.name = inner.name + "+null-compute"

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None, return_softmax=False):
        from flashserve.server.backends.base import ForwardResult
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        return ForwardResult(out=torch.empty_like(q), softmax_lse=lse, s_dmask=None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-tokens", default="32768,0")
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="server compute threads (default: the server's)")
    p.add_argument("--switch-interval-us", type=int, default=0, help="sys.setswitchinterval for this process (0: keep)")
    p.add_argument("--null-compute", action="store_true", help="skip the attention itself (service overhead only)")
    p.add_argument("--large-mb", type=int, default=0, help="instead: round trips of one q of this size over gRPC chunks")
    args = p.parse_args()
    if args.switch_interval_us:
        sys.setswitchinterval(args.switch_interval_us / 1e6)
    if args.large_mb:
        return large(args)
    for bt in [int(x) for x in args.batch_tokens.split(",")]:
        cfg = ServerConfig(host="127.0.0.1", port=0, device=args.device, allow_shm=True, max_concurrent=256,
                           batch_tokens=bt, batch_delay_us=500,
                           **({"workers": args.workers} if args.workers else {}))
        backend = None
        if args.null_compute:
            from flashserve.server.backends import create_backend
            backend = NullComputeBackend(create_backend("auto", args.device))
        with BackgroundServer(cfg, backend) as srv:
            bench = [sys.executable, "-m", "flashserve.server.cli", "bench", srv.target, "--tokens", "512", "--heads",
                     "16", "--head-dim", "64", "--dtype", "bfloat16", "--transport", "shm", "--concurrency",
                     str(args.concurrency), "--processes", str(args.processes), "--no-progress"]
            subprocess.run(bench + ["--requests", "256"], capture_output=True, check=True)  # warm-up
            prof = cProfile.Profile()
            srv._loop.call_soon_threadsafe(prof.enable)
            before, t0 = thread_cpu(), time.perf_counter()
            r = subprocess.run(bench + ["--requests", str(args.requests)], capture_output=True, text=True, check=True)
            after, wall = thread_cpu(), time.perf_counter() - t0
            done = threading.Event()
            srv._loop.call_soon_threadsafe(lambda: (prof.disable(), done.set()))
            done.wait(10)
            row = [line for line in r.stdout.splitlines() if line.startswith(f"| {args.concurrency} ")]
            print(f"\n=== batch_tokens={bt} backend {srv.service.backend.name} on {args.device}: {row}")
            for line in r.stdout.splitlines():
                if line.startswith("concurrency"):
                    print(line)
            by = collections.Counter()
            for tid, (name, cpu) in after.items():
                by[group(name)] += cpu - before.get(tid, (name, 0.0))[1]
            n = args.requests
            print(f"server CPU ms/request {sum(by.values()) * 1e3 / n:.2f} (wall {wall:.1f} s) by thread:")
            for name, cpu in by.most_common(12):
                if cpu > 0:
                    print(f"   {cpu * 1e3 / n:6.3f}  {name}")
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
            print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
