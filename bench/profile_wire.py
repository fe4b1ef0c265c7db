"""Where a large forward round trip over the gRPC chunk path spends its time: client-side arrival times of the
reply's chunks, the server's stage times, and (with --pyspy DIR) py-spy profiles of the client and the server.

    python bench/profile_wire.py [--device cuda] [--mb 64] [--calls 20] [--pyspy DIR]

The payload is bench/service.py's: q of the given size (head dim 256, one head, bf16 on CUDA, fp32 on CPU) and
16-token k / v, so compute is small and the wire dominates. A raw grpcio byte stream (bench/service.py's raw
server) moving the same bytes runs in turn with it, as the yardstick."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service as svc  # noqa: E402 - bench/service.py: the servers and the payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--pyspy", default="", help="folder for py-spy raw profiles of client and server")
    ap.add_argument("--server-args", default="")
    ap.add_argument("--chunk-bytes", type=int, default=0, help="largest chunk (0: the client's default)")
    ap.add_argument("--no-read-ahead", action="store_true", help="client receives on the calling thread (A/B)")
    args = ap.parse_args(argv)

    import grpc

    import flashserve
    from flashserve import wire
    from flashserve.autograd import make_params

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    q, k, v, cu_q, cu_k = svc.forward_inputs(args.mb * svc.MB, dtype)
    params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, q.shape[0], 16, False)
    up = sum(t.numel() * t.element_size() for t in (q, k, v, cu_q, cu_k))
    down = q.numel() * q.element_size() + q.shape[0] * 4
    chunks = [bytes(svc.CHUNK)] * (max(up, down) // svc.CHUNK + 1)
    opts = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20)]

    # Arrival time of each reply frame on the client (wrapping the deserializer: it runs as each message lands).
    arrivals = []
    decode = wire.decode_frame

    def timed_decode(data):
        arrivals.append(time.perf_counter())
        return decode(data)

    if args.no_read_ahead:
        wire.READ_AHEAD_BYTES = 1 << 62
    wire.decode_frame = timed_decode  # before the client exists: its stubs take the deserializer when made
    with tempfile.TemporaryDirectory() as tmp:
        fs = svc.Proc(["--backend", "auto", "--device", args.device, *args.server_args.split()], tmp)
        raw = svc.Proc([], tmp, raw=True)
        try:
            with flashserve.Client(fs.target, timeout=600, transport="bytes",
                                   chunk_bytes=args.chunk_bytes or wire.DEFAULT_CHUNK_BYTES) as c, \
                    grpc.insecure_channel(raw.target, options=opts) as ch:
                c.forward(q, k, v, cu_q, cu_k, params)  # warm-up (server buffers, kernels)
                svc.raw_round_trip(ch, up, down, chunks)
                spies = []
                if args.pyspy:
                    os.makedirs(args.pyspy, exist_ok=True)
                    dur = max(3, int(args.calls * 0.25))
                    for name, pid in (("server", fs.proc.pid), ("client", os.getpid())):
                        for gil in (False, True):
                            if gil and name == "client":
                                continue
                            out = os.path.join(args.pyspy, f"{name}{'_gil' if gil else ''}.raw")
                            spies.append(subprocess.Popen(
                                ["py-spy", "record", "--pid", str(pid), "--duration", str(dur), "--rate", "200",
                                 "--format", "raw", "--threads", "-o", out, *(["--gil"] if gil else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(1.0)
                rows = []
                for _ in range(args.calls):
                    t_raw = svc.raw_round_trip(ch, up, down, chunks)
                    arrivals.clear()
                    t0 = time.perf_counter()
                    reply, outs = c.forward(q, k, v, cu_q, cu_k, params)
                    t1 = time.perf_counter()
                    tm = reply.timings
                    first, last = (arrivals[0] - t0, arrivals[-1] - t0) if arrivals else (0.0, 0.0)
                    rows.append(dict(raw=t_raw, total=t1 - t0, first_reply_frame=first, last_reply_frame=last,
                                     after_last=t1 - t0 - last, receive=tm.receive_s, queue=tm.queue_s,
                                     copy_in=tm.copy_in_s, compute=tm.compute_s, copy_out=tm.copy_out_s,
                                     frames=len(arrivals)))
                    del outs
                for p in spies:
                    p.wait(timeout=120)
        finally:
            fs.stop()
            raw.stop()
            wire.decode_frame = decode
    print(f"read ahead {'off' if args.no_read_ahead else 'on'}, chunks up to {args.chunk_bytes or wire.DEFAULT_CHUNK_BYTES} B")
    print(f"{args.mb} MB up ({up} B) + {down} B down, {args.calls} calls, device {args.device}; medians, ms:")
    keys = list(rows[0])
    for key in keys:
        vals = [r[key] for r in rows]
        scale = 1 if key == "frames" else 1e3
        print(f"  {key:18s} {statistics.median(vals) * scale:9.2f}   (min {min(vals) * scale:.2f}, max "
              f"{max(vals) * scale:.2f})")
    med = {key: statistics.median(r[key] for r in rows) for key in keys}
    print(f"  ratio raw/total    {med['raw'] / med['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
