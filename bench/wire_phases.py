"""The gRPC chunk path by direction, against raw grpcio, with A/B settings taken in turn in one run.

    python bench/wire_phases.py [--mb 64,256] [--repeats 15] [--settings join,nogil] [--streams 1,2,4]

Kinds of call (each repeat runs every kind once, in turn, so a shared host's drift hits all alike):
  raw_up / raw_rt      raw grpcio stream (bench/service.py's server): the payload up only / up and as much back
  raw_rt_xN            the same round trip split over N streams on N connections, in parallel
  <setting>_up         flashserve forward with a tiny q and the payload as k and v: upload only (out is tiny)
  <setting>_rt         flashserve forward with the payload as q: the payload up and out (as large) back
Settings (a flashserve server per distinct server environment; the client follows the setting):
  join     FLASHSERVE_NOGIL_ENCODE=0 on both sides (chunk frames built with bytes.join, the GIL held)
  nogil    chunk frames filled by numpy with the GIL released (client/wire.py encode_chunk): the default
  noahead  nogil, and the client reads the reply on the calling thread (no read-ahead thread)
  chunk16  nogil, and the client asks for chunks of up to 16 MB (both ways)
  nocopy   nogil, and the client drops the reply's chunks instead of copying them out (diagnosis only)
  noahead_nocopy, sw500 (the server runs with --gil-switch-us 500)
Prints medians (ms), MB/s, the median of per-repeat ratios raw / ours (each against the same repeat's raw), and
for round trips the client-side arrival of the first reply message and the reply phase (first to last message)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service as svc  # noqa: E402 - bench/service.py: the servers and the payload

NOGIL = {"FLASHSERVE_NOGIL_ENCODE": "1"}


def setting(env=None, flags="", chunk_bytes=0, read_ahead=True, copy=True):
    """A server environment and serve flags, and how the client reads (read-ahead; copy=False: the client drops
    the reply's chunks instead of copying them into the results: a diagnosis of the client's copy)."""
    return dict(env=env or NOGIL, flags=flags, chunk_bytes=chunk_bytes, read_ahead=read_ahead, copy=copy)


SETTINGS = {"join": setting({"FLASHSERVE_NOGIL_ENCODE": "0"}), "nogil": setting(),
            "noahead": setting(read_ahead=False), "chunk16": setting(chunk_bytes=16 << 20),
            "nocopy": setting(copy=False), "noahead_nocopy": setting(read_ahead=False, copy=False),
            "sw500": setting(flags="--gil-switch-us 500")}


def upload_inputs(nbytes: int, dtype):
    """q of 16 tokens; k and v of nbytes together (head dim 256, one head)."""
    d, itemsize = 256, torch.empty((), dtype=dtype).element_size()
    n = max(16, nbytes // (2 * d * itemsize))
    q = torch.randn(16, 1, d).to(dtype)
    k, v = torch.randn(n, 1, d).to(dtype), torch.randn(n, 1, d).to(dtype)
    return q, k, v, torch.tensor([0, 16], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mb", default="64,256")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--settings", default="join,nogil")
    ap.add_argument("--streams", default="1,2,4", help="raw round trips split over this many parallel streams")
    ap.add_argument("--server-args", default="")
    args = ap.parse_args(argv)

    import grpc

    import flashserve
    from flashserve import wire
    from flashserve.autograd import make_params

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    settings = args.settings.split(",")
    streams = [int(s) for s in args.streams.split(",") if int(s) > 1]
    opts = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20),
            ("grpc.use_local_subchannel_pool", 1)]
    biggest = max(int(m) for m in args.mb.split(",")) * svc.MB
    rng = np.random.default_rng(0)
    chunks = [rng.bytes(svc.CHUNK) for _ in range(biggest // svc.CHUNK + 2)]
    arrivals = []  # arrival times of the current call's reply messages
    decode = wire.decode_frame

    def timed_decode(data):
        arrivals.append(time.perf_counter())
        return decode(data)
    wire.decode_frame = timed_decode  # before the clients exist: their stubs take the deserializer when made
    read_ahead, copy_pieces = wire.READ_AHEAD_BYTES, wire.copy_pieces

    def raw_call(channel, up, down):
        """A raw round trip of distinct bytes, recording each reply message's arrival: (seconds, start time)."""
        arrivals.clear()
        t0 = time.perf_counter()
        return svc.raw_round_trip(channel, up, down, chunks, distinct=True, arrivals=arrivals), t0

    servers, clients, procs = {}, {}, []
    raw = None
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in settings:
                env, flags, chunk_bytes = (SETTINGS[name][key] for key in ("env", "flags", "chunk_bytes"))
                key = (tuple(sorted(env.items())), flags)
                if key not in servers:
                    os.environ.update(env)
                    servers[key] = svc.Proc(["--backend", "auto", "--device", args.device,
                                             *args.server_args.split(), *flags.split()], tmp)
                    procs.append(servers[key])
                    os.environ.clear()
                    os.environ.update(saved)
                clients[name] = flashserve.Client(servers[key].target, timeout=600, transport="bytes",
                                                  chunk_bytes=chunk_bytes or wire.DEFAULT_CHUNK_BYTES)
            raw = svc.Proc([], tmp, raw=True)
            chans = [grpc.insecure_channel(raw.target, options=opts) for _ in range(max([1, *streams]))]
            for mb in (int(m) for m in args.mb.split(",")):
                payload = mb * svc.MB
                inputs = {"up": upload_inputs(payload, dtype), "rt": svc.forward_inputs(payload, dtype)}
                sizes = {}
                for kind, (q, k, v, cq, ck) in inputs.items():
                    up = sum(t.numel() * t.element_size() for t in (q, k, v, cq, ck))
                    sizes[kind] = (up, q.numel() * q.element_size() + q.shape[0] * 4)

                def fs(name, kind):
                    q, k, v, cq, ck = inputs[kind]
                    params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, q.shape[0], k.shape[0], False)
                    wire._NOGIL_ENCODE = SETTINGS[name]["env"]["FLASHSERVE_NOGIL_ENCODE"] != "0"
                    wire.READ_AHEAD_BYTES = read_ahead if SETTINGS[name]["read_ahead"] else 1 << 62
                    wire.copy_pieces = copy_pieces if SETTINGS[name]["copy"] else (lambda pieces, data: None)
                    arrivals.clear()
                    t0 = time.perf_counter()
                    reply, _ = clients[name].forward(q, k, v, cq, ck, params)
                    return time.perf_counter() - t0, t0, reply.timings

                def raw_split(n):
                    up, down = sizes["rt"]
                    per = up // n // svc.CHUNK + 1

                    def go(i):
                        svc.raw_round_trip(chans[i], up // n, down // n, chunks[i * per:], distinct=True)
                    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    return time.perf_counter() - t0, None

                calls = {"raw_up": lambda: raw_call(chans[0], sizes["up"][0], 0),
                         "raw_rt": lambda: raw_call(chans[0], *sizes["rt"])}
                for n in streams:
                    calls[f"raw_rt_x{n}"] = lambda n=n: raw_split(n)
                for name in settings:
                    calls[f"{name}_up"] = lambda name=name: fs(name, "up")
                    calls[f"{name}_rt"] = lambda name=name: fs(name, "rt")
                for fn in calls.values():
                    fn()  # warm-up
                rec = {kind: [] for kind in calls}  # per repeat: (total, first reply, reply phase, timings)
                for _ in range(args.repeats):
                    for kind, fn in calls.items():
                        total, t0, *timings = fn()
                        first = phase = None
                        if t0 is not None and len(arrivals) > 1:
                            i = 0 if kind.startswith("raw") else 1  # flashserve's reply begins with its header
                            first, phase = arrivals[i] - t0, arrivals[-1] - arrivals[i]
                        rec[kind].append((total, first, phase, timings[0] if timings else None))
                print(f"\n{mb} MB payload ({args.device}, {args.repeats} repeats; up-only {sizes['up'][0]} B, "
                      f"round trip {sum(sizes['rt'])} B)")
                print("| call | median ms | MB/s | raw / this (median of per-repeat ratios) | first reply message ms | "
                      "reply phase ms | server receive ms | server copy in + compute + copy out ms |")
                print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

                def med(values, scale=1e3):
                    values = [x for x in values if x is not None]
                    return f"{statistics.median(values) * scale:.1f}" if values else "-"
                for kind, rows in rec.items():
                    ts = [r[0] for r in rows]
                    nbytes = sizes["up"][0] if kind.endswith("_up") else sum(sizes["rt"])
                    ref = [r[0] for r in rec["raw_up" if kind.endswith("_up") else "raw_rt"]]
                    ratio = statistics.median(r / t for r, t in zip(ref, ts))
                    tm = [r[3] for r in rows if r[3] is not None]
                    print(f"| {kind} | {statistics.median(ts) * 1e3:.1f} | {nbytes / statistics.median(ts) / svc.MB:.0f} "
                          f"| {ratio:.2f} | {med(r[1] for r in rows) if kind.endswith('rt') else '-'} | "
                          f"{med(r[2] for r in rows) if kind.endswith('rt') else '-'} | "
                          f"{med(t.receive_s for t in tm)} | "
                          f"{med(t.copy_in_s + t.compute_s + t.copy_out_s for t in tm)} |", flush=True)
        finally:
            wire.decode_frame, wire.copy_pieces = decode, copy_pieces
            for c in clients.values():
                c.close()
            for p in procs:
                p.stop()
            if raw is not None:
                raw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
