"""CPU time per large forward round trip by server thread: flashserve's gRPC chunk path against the raw grpcio
byte stream (bench/service.py's raw server, distinct bytes each way), on any machine.

    python bench/server_threads.py [--mb 64] [--calls 20] [--server-heap-keep-mb N] [--client-heap-keep-mb N]

Where bench/service.py says how fast, this says where each server spends its CPU: its event-loop thread (gRPC's
message handling and ours), gRPC's core threads, and our helper threads (chunk copies, reply encoding, compute).
The heap options set flashserve.heap's allocator settings in the flashserve server and in this (client) process."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service as svc  # noqa: E402 - bench/service.py: the servers and the payload

MB = 1 << 20


def page_faults(pid: int) -> int:
    """Minor page faults of the process so far (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def thread_cpu(pid: int) -> dict:
    """CPU seconds so far per thread kind: the main (event-loop) thread, gRPC's core threads, the others."""
    out = {"event loop": 0.0, "gRPC core": 0.0, "other threads": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        kind = "event loop" if int(tid) == pid else ("gRPC core" if name.startswith(("event_engine", "grpc")) else
                                                     "other threads")
        out[kind] += cpu
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-heap-keep-mb", type=int, default=256)
    p.add_argument("--client-heap-keep-mb", type=int, default=256)
    args = p.parse_args()
    import grpc
    import torch

    import flashserve
    from flashserve.autograd import make_params
    from flashserve.heap import keep_freed_memory

    keep_freed_memory(args.client_heap_keep_mb << 20)
    tmp = tempfile.mkdtemp(prefix="fsthreads")
    fs = svc.Proc(["--backend", "auto", "--device", args.device, "--max-concurrent", "256",
                   "--heap-keep-mb", str(args.server_heap_keep_mb)], tmp)
    raw = svc.Proc([], tmp, raw=True)
    try:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        q, k, v, cu_q, cu_k = svc.forward_inputs(args.mb * MB, dtype)
        params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, q.shape[0], 16, False)
        up = sum(t.numel() * t.element_size() for t in (q, k, v, cu_q, cu_k))
        down = q.numel() * q.element_size() + q.shape[0] * 4
        rng = np.random.default_rng(0)
        chunks = [rng.bytes(svc.CHUNK) for _ in range(up // svc.CHUNK + 2)]
        opts = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20)]
        with flashserve.Client(fs.target, timeout=600, transport="bytes",
                               heap_keep_bytes=args.client_heap_keep_mb << 20) as client, \
                grpc.insecure_channel(raw.target, options=opts) as channel:
            calls = {"raw gRPC": (raw.proc.pid, lambda: svc.raw_round_trip(channel, up, down, chunks, True)),
                     "flashserve": (fs.proc.pid, lambda: client.forward(q, k, v, cu_q, cu_k, params)[0])}
            for name, (pid, call) in calls.items():
                call()  # warm-up
                before, faults, compute = thread_cpu(pid), page_faults(pid), 0.0
                own_faults = page_faults(os.getpid())
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    reply = call()
                    compute += getattr(getattr(reply, "timings", None), "compute_s", 0.0)
                wall = (time.perf_counter() - t0) / args.calls
                after, faults = thread_cpu(pid), page_faults(pid) - faults
                own_faults = page_faults(os.getpid()) - own_faults
                cpu = ", ".join(f"{k} {(after[k] - before[k]) / args.calls * 1e3:.1f}" for k in after)
                print(f"{name:10s}: {wall * 1e3:6.1f} ms per round trip (server compute {compute / args.calls * 1e3:.1f}"
                      f" ms); server CPU ms per round trip: {cpu}; page faults per round trip {faults / args.calls:.0f} (client {own_faults / args.calls:.0f})",
                      flush=True)
    finally:
        fs.stop()
        raw.stop()
    print(f"({args.mb} MB up and down, {args.calls} calls each; heap keep: server {args.server_heap_keep_mb} MB, "
          f"client {args.client_heap_keep_mb} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
