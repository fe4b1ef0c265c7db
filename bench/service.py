"""Service benchmark: flashserve over loopback against raw gRPC bytes on the same host, in one run.

    python bench/service.py [--quick] [--out bench/results] [--device cpu|cuda] [--skip-batching]

Servers run in their own processes (`flashserve serve`, and a generic grpcio server that only counts the
bytes it gets and sends back as many as asked), so the client's threads do not share a GIL with them.

Sections (each ratio is taken in this run, on this machine):
  1. forward round trips, payload 1 MB .. 256 MB (q of the given size; tiny k/v so compute stays small),
     payload MB/s (bytes up + bytes down) against a raw gRPC byte stream moving the same bytes both ways;
     target >= 0.8 of raw for >= 16 MB; server compute reported separately.
  2. shared memory against the gRPC chunk path for >= 64 MB (target >= 5x).
  3. batching on / off: concurrent clients sending 512-token, 16-head, head-dim-64 bf16 forwards over
     shared memory; requests/s, kernel launches per request, p50 / p99.
  4. residuals: wire bytes of one forward+backward step against the forward alone (target <= 1.6x).
  5. the server-side time split (queue, copy in, compute, copy out, wire) for one large and one small request.
Writes service_<device>_<date>.json and .md under --out."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RAW_METHOD = "/rawbench.Raw/Echo"
CHUNK = 4 << 20
MB = 1 << 20


# ---- the raw gRPC byte server (its own process) ---------------------------------------------------
def raw_server_main(port_file: str) -> None:
    """Bidi stream: the client's first message is 8 bytes (little-endian count of bytes wanted back), and a ninth
    byte 1 when the reply should be distinct bytes, then data chunks; the server counts them, then answers with that
    many bytes in CHUNK-sized messages: one cached chunk sent again and again, or as many different chunks (made on
    first use, then kept), as a real reply's bytes are."""
    out_chunk = b"\x00" * CHUNK
    distinct: list = []  # distinct reply chunks, made on first use
    rng = np.random.default_rng(1)

    async def echo(request_iterator, context):
        want = None
        varied = False
        got = 0
        async for msg in request_iterator:
            if want is None:
                want = int.from_bytes(msg[:8], "little")
                varied = len(msg) > 8 and msg[8] == 1
                continue
            got += len(msg)
        sent = i = 0
        while sent < want:
            n = min(CHUNK, want - sent)
            if varied:
                while len(distinct) <= i:
                    distinct.append(rng.bytes(CHUNK))
                chunk = distinct[i]
                i += 1
            else:
                chunk = out_chunk
            yield chunk if n == CHUNK else chunk[:n]
            sent += n

    async def main():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 80 << 20),
                                          ("grpc.max_send_message_length", 80 << 20)])
        handler = grpc.method_handlers_generic_handler("rawbench.Raw", {
            "Echo": grpc.stream_stream_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        with open(port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(port_file + ".tmp", port_file)
        await server.wait_for_termination()

    asyncio.run(main())


class Proc:
    """A server subprocess; `target` once it listens."""

    def __init__(self, args, tmpdir: str, raw: bool = False):
        self.target = None
        if raw:
            port_file = os.path.join(tmpdir, f"raw_{os.getpid()}_{time.monotonic_ns()}")
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-server", port_file])
            for _ in range(600):
                if os.path.exists(port_file):
                    self.target = f"127.0.0.1:{open(port_file).read().strip()}"
                    break
                time.sleep(0.05)
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "flashserve.server.cli", "serve", "--port", "0",
                                          "--log-level", "WARNING", *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
            for _ in range(50):
                line = self.proc.stdout.readline()
                m = re.search(r"listening on ([\d.]+):(\d+)", line)
                if m:
                    self.target = f"{m.group(1)}:{m.group(2)}"
                    break
            threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain
        if self.target is None:
            self.stop()
            raise RuntimeError(f"server {args} did not start")

    def server_pids(self):
        """The processes that serve: the server itself and its children (`serve --processes N` / `--frontends N`)."""
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            kids.append(int(entry))
                except (OSError, ValueError):
                    continue
        return [self.proc.pid, *kids]  # the GPU process of `serve --frontends N` serves as well

    def cpu_s(self) -> float:
        """CPU seconds the server processes have used so far (user + system, all their threads)."""
        total = 0.0
        for pid in self.server_pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def thread_cpu_s(self):
        """(event-loop threads, all other threads, the started process's loop) CPU seconds so far: a server's main
        thread runs its asyncio loop; the started process is the server itself, the GPU process of `--frontends N`,
        or the supervisor of `--processes N`."""
        main = other = first = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.server_pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # the thread ended
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / tick
                if int(tid) == pid:
                    main += cpu
                    if pid == self.proc.pid:
                        first = cpu
                else:
                    other += cpu
        return main, other, first

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def raw_round_trip(channel, up: int, down: int, chunks, distinct: bool = False, arrivals=None) -> float:
    """Seconds to stream `up` bytes (from `chunks`, in order) and get `down` back. distinct: the reply's chunks are
    all different (else the server sends one cached chunk again and again). arrivals: a list that gets each reply
    message's arrival time (time.perf_counter)."""
    call = channel.stream_stream(RAW_METHOD)

    def frames():
        yield down.to_bytes(8, "little") + (b"\x01" if distinct else b"")
        left = up
        for c in chunks:
            if left <= 0:
                break
            piece = c if len(c) <= left else c[:left]
            left -= len(piece)
            yield piece

    t0 = time.perf_counter()
    got = 0
    for msg in call(frames(), timeout=600):
        got += len(msg)
        if arrivals is not None:
            arrivals.append(time.perf_counter())
    dt = time.perf_counter() - t0
    assert got == down, (got, down)
    return dt


def interleaved_medians(calls, repeats: int):
    """Median time of each call, the calls taken in turn (after one warm-up each)."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


# ---- 1 + 2: payload sweep, raw gRPC, shared memory -----------------------------------------------
def forward_inputs(up_bytes: int, dtype=torch.float32):
    """q of about up_bytes (head dim 256, one head), 16 keys: the wire dominates, not compute."""
    d = 256
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = max(16, up_bytes // (d * itemsize))
    q = torch.randn(n, 1, d).to(dtype)
    k = torch.randn(16, 1, d).to(dtype)
    v = torch.randn(16, 1, d).to(dtype)
    return q, k, v, torch.tensor([0, n], dtype=torch.int32), torch.tensor([0, 16], dtype=torch.int32)


def payload_sweep(fs_target, raw_target, sizes_mb, repeats, shm_from_mb, dtype=torch.float32, chunk_bytes=None,
                  heap_keep_bytes=256 << 20):
    import flashserve
    from flashserve.autograd import make_params

    rows = []
    big = max(sizes_mb) * MB
    payload_chunks = [bytes(CHUNK)] * (big // CHUNK + 1)
    # The same bytes as distinct chunks, as a real payload is (one cached chunk sent again and again streams from
    # the CPU's caches, not from memory): raw gRPC moving the payload's own volume of different bytes.
    rng = np.random.default_rng(0)
    distinct_chunks = [rng.bytes(CHUNK) for _ in range(big // CHUNK + 1)]
    opts = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20)]
    from flashserve import wire

    with flashserve.Client(fs_target, timeout=600, transport="bytes", heap_keep_bytes=heap_keep_bytes,
                           chunk_bytes=chunk_bytes or wire.DEFAULT_CHUNK_BYTES) as cb, \
            flashserve.Client(fs_target, timeout=600, transport="shm") as cs, \
            grpc.insecure_channel(raw_target, options=opts) as raw:
        for mb in sizes_mb:
            q, k, v, cu_q, cu_k = forward_inputs(mb * MB, dtype)
            params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, q.shape[0], 16, False)
            reps = repeats
            stats = {}

            def fs_call(client, stats=stats):
                t0 = time.perf_counter()
                reply, outs = client.forward(q, k, v, cu_q, cu_k, params)
                dt = time.perf_counter() - t0
                stats.setdefault(id(client), []).append((dt, reply.timings))
                return dt

            up = sum(t.numel() * t.element_size() for t in (q, k, v, cu_q, cu_k))
            down = q.numel() * q.element_size() + q.shape[0] * 4
            # interleaved (raw, gRPC path, shm, raw, ...): drifts of a noisy machine hit all of them alike
            calls = {"raw": lambda: raw_round_trip(raw, up, down, payload_chunks),
                     "raw_distinct": lambda: raw_round_trip(raw, up, down, distinct_chunks, distinct=True),
                     "fs": lambda: fs_call(cb)}
            if mb >= shm_from_mb:
                calls["shm"] = lambda: fs_call(cs)
            times = interleaved_medians(calls, reps)
            t_fs, t_raw, t_rawd = times["fs"], times["raw"], times["raw_distinct"]
            timings = [t for _, t in stats[id(cb)][1:]]  # [0] is the warm-up call

            def net(client):  # median of (round trip - that call's own server compute): noisy computes cancel
                return statistics.median(max(1e-9, dt - t.compute_s) for dt, t in stats[id(client)][1:])
            row = {"payload_mb": mb, "up_bytes": up, "down_bytes": down,
                   "flashserve_s": t_fs, "flashserve_mb_s": (up + down) / t_fs / MB,
                   "raw_grpc_s": t_raw, "raw_grpc_mb_s": (up + down) / t_raw / MB,
                   "ratio": t_raw / t_fs,
                   "raw_distinct_s": t_rawd, "raw_distinct_mb_s": (up + down) / t_rawd / MB,
                   "ratio_distinct": t_rawd / t_fs,
                   "server_compute_s": statistics.median(t.compute_s for t in timings),
                   "server_receive_s": statistics.median(t.receive_s for t in timings)}
            row["ratio_excl_compute"] = t_raw / net(cb)
            row["ratio_distinct_excl_compute"] = t_rawd / net(cb)
            if mb >= shm_from_mb:
                t_shm = times["shm"]
                row.update(shm_s=t_shm, shm_mb_s=(up + down) / t_shm / MB, shm_vs_grpc=t_fs / t_shm,
                           shm_vs_grpc_excl_compute=net(cb) / net(cs))
                assert cs.uses_shm()
            rows.append(row)
            print(f"  {mb:4d} MB: flashserve {row['flashserve_mb_s']:7.0f} MB/s, raw gRPC {row['raw_grpc_mb_s']:7.0f} "
                  f"MB/s (distinct bytes {row['raw_distinct_mb_s']:7.0f}), ratio {row['ratio']:.2f} "
                  f"({row['ratio_distinct']:.2f}) (compute {row['server_compute_s'] * 1e3:.1f} ms)"
                  + (f", shm {row['shm_mb_s']:7.0f} MB/s = {row['shm_vs_grpc']:.1f}x" if "shm_s" in row else ""),
                  flush=True)
            q = k = v = None  # free the payload before the next size
    return rows


# ---- 3: batching on / off -------------------------------------------------------------------------
def host_cpu_ticks():
    """(busy, total) jiffies of all CPUs of this host (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_seconds(metrics_port: int, processes: int = 1):
    """flashserve_worker_seconds_total by kind (busy, cpu, gpu_wait), summed over the servers' /metrics (process i
    of `serve --processes N` serves them on metrics_port + i)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for i in range(processes):
        for attempt in range(120):  # a process of `serve --processes N` may still be starting
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=10).read().decode()
                break
            except OSError:
                if attempt == 119:
                    raise
                time.sleep(0.5)
        for fam in text_string_to_metric_families(text):
            if fam.name == "flashserve_worker_seconds":
                for sample in fam.samples:
                    if sample.name.endswith("_total"):
                        out[sample.labels["kind"]] = out.get(sample.labels["kind"], 0.0) + sample.value
    return out


def batching_pair(tmpdir, device, concurrency, count, extra, processes=1, rounds=3):
    """Batching on against off. Both servers run the whole time and take the load in turn, `rounds` rounds of
    `count` requests each (on/off, then off/on, ...), so that a shared host's changing load weighs on both alike;
    req/s = all requests / all time per setting, latency = the median of the rounds' percentiles, and each round's
    own on/off ratio is reported too."""
    from flashserve.server.loadtest import Workload, run_sweep

    wl = Workload(tokens=512, heads=16, head_dim=64, dtype="bfloat16", op="forward")
    procs = int(extra[extra.index("--processes") + 1]) if "--processes" in extra else 1
    if "--frontends" in extra:  # metrics: the engine on the port, front end i on port + 1 + i
        procs = int(extra[extra.index("--frontends") + 1]) + 1
    settings = (("batching on", ["--batch-tokens", "32768", "--batch-delay-us", "500"]),
                ("batching off", ["--batch-tokens", "0"]))
    servers, ports = {}, {}
    try:
        for name, flags in settings:
            ports[name] = free_port()  # (with --processes N, N ports from here on: free in practice on a test host)
            servers[name] = Proc(["--backend", "auto", "--allow-shm", "--device", device, "--metrics-port",
                                  str(ports[name]), *flags, *extra], tmpdir)
        acc = {name: dict(requests=0, warmup=0, duration_s=0.0, errors=0, server_cpu_s=0.0, loop=[0.0, 0.0, 0.0],
                          work={"busy": 0.0, "cpu": 0.0, "gpu_wait": 0.0}, host=[0, 0], levels=[])
               for name, _ in settings}
        for r in range(rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for name, _ in order:
                srv, a = servers[name], acc[name]
                cpu0, threads0 = srv.cpu_s(), srv.thread_cpu_s()  # counts the warm-up requests too
                work0, host0 = worker_seconds(ports[name], procs), host_cpu_ticks()
                rep = run_sweep(srv.target, wl, [concurrency], duration=60, count=count, warmup=1, transport="shm",
                                progress=False, client_kwargs=dict(timeout=600), processes=processes)
                a["server_cpu_s"] += srv.cpu_s() - cpu0
                threads1, work1, host1 = srv.thread_cpu_s(), worker_seconds(ports[name], procs), host_cpu_ticks()
                for i in range(3):
                    a["loop"][i] += threads1[i] - threads0[i]
                for k in a["work"]:
                    a["work"][k] += work1.get(k, 0.0) - work0.get(k, 0.0)
                if host0 and host1:
                    a["host"][0] += host1[0] - host0[0]
                    a["host"][1] += host1[1] - host0[1]
                lvl = rep["levels"][0]
                a["levels"].append(lvl)
                a["requests"] += lvl["requests"]
                a["warmup"] += concurrency  # the counters also saw the warm-up requests (one per client)
                a["duration_s"] += lvl["duration_s"]
                a["errors"] += lvl["error_count"]
                a["transport"], a["server"] = rep["transport"], rep["server"]
            on, off = (acc[n]["levels"][-1]["requests_per_s"] for n, _ in settings)
            print(f"  round {r + 1}: on {on:.1f}, off {off:.1f} req/s ({on / off:.2f}x)", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    out = {}
    for name, _ in settings:
        a = acc[name]
        lv = a["levels"]
        n = max(1, a["requests"] + a["warmup"])
        med = lambda key, sub=None: statistics.median(x[key][sub] if sub else x[key] for x in lv)  # noqa: E731
        o = out[name] = {
            "requests": a["requests"], "error_count": a["errors"], "duration_s": a["duration_s"],
            "requests_per_s": a["requests"] / max(1e-9, a["duration_s"]),
            "tokens_per_s": a["requests"] * wl.tokens / max(1e-9, a["duration_s"]),
            "latency_ms": {q: med("latency_ms", q) for q in lv[0]["latency_ms"]},
            "mean_batch_requests": sum(x["mean_batch_requests"] * x["requests"] for x in lv) / max(1, a["requests"]),
            "launches_per_request": sum(x["launches_per_request"] * x["requests"] for x in lv) / max(1, a["requests"]),
            "stage_ms_p50": {k: statistics.median(x["stage_ms_p50"].get(k, float("nan")) for x in lv)
                             for k in lv[0]["stage_ms_p50"]},
            "rounds_requests_per_s": [x["requests_per_s"] for x in lv],
            "server_cpu_ms_per_request": a["server_cpu_s"] * 1e3 / n}
        # where the server's time per request goes: its event-loop threads' CPU, and the compute workers' wall
        # time split into CPU, waits for the GPU and the rest (runnable but not running: the GIL, a busy host)
        w = a["work"]
        o["server_ms_per_request"] = {
            "event_loop_cpu": a["loop"][0] * 1e3 / n, "other_threads_cpu": a["loop"][1] * 1e3 / n,
            "worker_busy": w["busy"] * 1e3 / n, "worker_cpu": w["cpu"] * 1e3 / n,
            "worker_gpu_wait": w["gpu_wait"] * 1e3 / n,
            "worker_other": (w["busy"] - w["cpu"] - w["gpu_wait"]) * 1e3 / n,
            "gpu_process_loop_cpu": a["loop"][2] * 1e3 / n}  # of event_loop_cpu
        # busy workers on average over the timed requests (the warm-up's share taken out)
        o["worker_utilisation"] = w["busy"] * a["requests"] / n / max(1e-9, a["duration_s"])
        if a["host"][1]:  # how busy the whole host was (clients included): are the clients the limit?
            o["host_cpu_busy_fraction"] = a["host"][0] / a["host"][1]
        o["transport"] = a["transport"]
        o["server_device"] = a["server"]["device"]
        o["server_backend"] = a["server"]["backend"]
        print(f"  {name}: {o['requests_per_s']:.1f} req/s, {o['launches_per_request']:.3f} launches/request, "
              f"p50 {o['latency_ms']['p50']:.0f} ms, p99 {o['latency_ms']['p99']:.0f} ms, server CPU "
              f"{o['server_cpu_ms_per_request']:.2f} ms/request, host CPU busy "
              f"{o.get('host_cpu_busy_fraction', float('nan')):.0%}", flush=True)
        print("    server ms/request: " + ", ".join(f"{k} {v:.2f}" for k, v in o["server_ms_per_request"].items())
              + f"; workers busy on average {o['worker_utilisation']:.2f}", flush=True)
    out["throughput_ratio"] = out["batching on"]["requests_per_s"] / out["batching off"]["requests_per_s"]
    out["round_ratios"] = [a / b for a, b in zip(out["batching on"]["rounds_requests_per_s"],
                                                 out["batching off"]["rounds_requests_per_s"])]
    out["workload"] = dict(wl.shape, concurrency=concurrency, requests=count, rounds=rounds,
                           client_processes=processes)
    return out


# ---- 4: residual wire bytes -----------------------------------------------------------------------
def residual_bytes(fs_target):
    import flashserve
    from flashserve.autograd import make_params

    n, h, d = 4096, 16, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(n, h, d, generator=g).bfloat16() for _ in range(4))
    cu = torch.tensor([0, n], dtype=torch.int32)
    params = make_params(None, True, (-1, -1), 0.0, 0.0, 0, 0, False, n, n, False)
    res = {"shape": f"{n} tokens x {h} heads x {d}, bf16, causal"}
    with flashserve.Client(fs_target, timeout=600, transport="bytes") as c:
        def moved():
            return c.bytes_sent, c.bytes_received

        s0, r0 = moved()
        reply, outs = c.forward(q, k, v, cu, cu, params, keep_residuals=True)
        s1, r1 = moved()
        assert reply.residual_handle
        c.backward(dout, params, residual_handle=reply.residual_handle)
        s2, r2 = moved()
        c.release([reply.residual_handle])
        c.backward(dout, params, q, k, v, outs["out"], outs["softmax_lse"], cu, cu)
        s3, r3 = moved()
    fwd_up, fwd_down = s1 - s0, r1 - r0
    bwd_up, bwd_down = s2 - s1, r2 - r1
    full_up, full_down = s3 - s2, r3 - r2
    res.update(forward_up=fwd_up, forward_down=fwd_down, backward_kept_up=bwd_up, backward_kept_down=bwd_down,
               backward_resend_up=full_up, backward_resend_down=full_down)
    res["step_vs_forward_upload_kept"] = (fwd_up + bwd_up) / fwd_up
    res["step_vs_forward_total_kept"] = (fwd_up + fwd_down + bwd_up + bwd_down) / (fwd_up + fwd_down)
    res["step_vs_forward_upload_resend"] = (fwd_up + full_up) / fwd_up
    res["step_vs_forward_total_resend"] = (fwd_up + fwd_down + full_up + full_down) / (fwd_up + fwd_down)
    print(f"  fwd+bwd / fwd wire bytes with residuals: upload {res['step_vs_forward_upload_kept']:.2f}x, both ways "
          f"{res['step_vs_forward_total_kept']:.2f}x (resending: {res['step_vs_forward_upload_resend']:.2f}x / "
          f"{res['step_vs_forward_total_resend']:.2f}x)", flush=True)
    return res


# ---- 5: time split --------------------------------------------------------------------------------
def time_split(fs_target, dtype=torch.float32):
    import flashserve
    from flashserve.autograd import make_params

    out = {}
    large = forward_inputs(64 * MB, dtype)
    cases = {"large (64 MB q, bytes)": (large, "bytes"),
             "large (64 MB q, shm)": (large, "shm"),
             "small (512 tok x 16 x 64 bf16, bytes)": (None, "bytes"),
             "small (512 tok x 16 x 64 bf16, shm)": (None, "shm")}
    g = torch.Generator().manual_seed(1)
    small = tuple(torch.randn(512, 16, 64, generator=g).bfloat16() for _ in range(3)) + (
        torch.tensor([0, 512], dtype=torch.int32),) * 2
    for name, (inputs, transport) in cases.items():
        q, k, v, cu_q, cu_k = inputs or small
        params = make_params(None, False, (-1, -1), 0.0, 0.0, 0, 0, False, q.shape[0], k.shape[0], False)
        with flashserve.Client(fs_target, timeout=600, transport=transport) as c:
            c.forward(q, k, v, cu_q, cu_k, params)  # warm-up
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                reply, _ = c.forward(q, k, v, cu_q, cu_k, params)
                total = time.perf_counter() - t0
                if best is None or total < best[0]:
                    best = (total, reply.timings)
        total, t = best
        server = t.queue_s + t.copy_in_s + t.compute_s + t.copy_out_s
        out[name] = {"total_ms": total * 1e3, "receive_ms": t.receive_s * 1e3, "queue_ms": t.queue_s * 1e3,
                     "copy_in_ms": t.copy_in_s * 1e3, "compute_ms": t.compute_s * 1e3,
                     "copy_out_ms": t.copy_out_s * 1e3, "wire_and_rest_ms": (total - server) * 1e3,
                     "batch_requests": t.batch_requests}
        print(f"  {name}: total {total * 1e3:.1f} ms = compute {t.compute_s * 1e3:.1f} + queue {t.queue_s * 1e3:.2f} + "
              f"copies {(t.copy_in_s + t.copy_out_s) * 1e3:.2f} + wire/rest {(total - server) * 1e3:.1f}", flush=True)
    return out


# ---- report ---------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
            mem = f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cpus, {mem}{gpu}"


def to_markdown(r) -> str:
    L = [f"# flashserve service benchmark ({r['device']})", "",
         f"- date: {r['date']}", f"- machine: {r['machine']}",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
         f"- server backend: {r.get('server', {}).get('backend', 'not recorded')} on "
         f"{r.get('server', {}).get('device', r['device'])}",
         f"- command: `{r['command']}` (total {r['total_s']:.0f} s)"]
    if "payload" in r:
        L += _payload_markdown(r)
    if r.get("batching"):
        L += _batching_markdown(r["batching"])
    if "residuals" in r:
        L += _residuals_markdown(r)
    return "\n".join(L) + "\n"


def _payload_markdown(r):
    L = ["", "## 1-2. Forward round trips over loopback vs raw gRPC bytes, and shared memory", "",
         "Payload = q (head dim 256, one head; fp32 on CPU, bf16 on CUDA) up plus out + lse down; k/v are 16 tokens, so compute is small "
         f"and reported apart. MB/s = (bytes up + bytes down) / round-trip time, median of {r.get('repeats', 'the')} "
         "repeats. "
         "Raw gRPC = a generic grpcio server (own process) reading the same number of bytes as 4 MB messages and "
         "streaming as many back, in two forms: one 4 MB chunk sent again and again each way (cache-resident bytes), "
         "and distinct chunks each way (the payload's own volume of different bytes, as flashserve moves). Raw, "
         "distinct raw, gRPC path and shm calls are taken in turn (medians per kind). "
         "Excl. compute: the median over calls of (round trip - that call's server compute time). "
         f"flashserve's gRPC path: chunks of about 1/16 of the payload, 1 MB to "
         f"{r.get('chunk_bytes', 4 << 20) // 1024} KB (wire.chunk_size_for). "
         + (f"Heap (flashserve.heap): this client process keeps {r['heap']['client_keep_mb']} MB of freed memory "
            f"(0: glibc's defaults), the flashserve server runs with --heap-keep-mb "
            f"{r['heap']['server_keep_mb'] if r['heap']['server_keep_mb'] is not None else 'default (256)'}."
            if "heap" in r else ""), "",
         "| payload up | flashserve gRPC MB/s | raw gRPC MB/s (one chunk / distinct) | ratio (to one chunk / distinct) | "
         "server compute ms | ratio excl. compute (one chunk / distinct) | shm MB/s | shm / gRPC chunks | "
         "same, excl. compute |",
         "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["payload"]:
        shm = (f"{row['shm_mb_s']:.0f} | {row['shm_vs_grpc']:.1f}x | {row['shm_vs_grpc_excl_compute']:.1f}x"
               if "shm_s" in row else "- | - | -")
        dist = row.get("raw_distinct_mb_s")
        raw = f"{row['raw_grpc_mb_s']:.0f}" + (f" / {dist:.0f}" if dist else "")
        ratio = f"{row['ratio']:.2f}" + (f" / {row['ratio_distinct']:.2f}" if dist else "")
        excl = f"{row['ratio_excl_compute']:.2f}" + (f" / {row['ratio_distinct_excl_compute']:.2f}" if dist else "")
        L.append(f"| {row['payload_mb']} MB | {row['flashserve_mb_s']:.0f} | {raw} | {ratio} | "
                 f"{row['server_compute_s'] * 1e3:.1f} | {excl} | {shm} |")
    return L


def _batching_markdown(b):
    w = b["workload"]
    L = ["", f"## 3. Batching on / off ({w['concurrency']} concurrent clients in {w.get('client_processes', 1)} "
              f"processes, {w.get('rounds', 1)} rounds of {w['requests']} forward requests per setting, taken in "
              f"turn, of "
              f"{w['tokens']} tokens x {w['heads']} heads x {w['head_dim']} {w['dtype']}, transport "
              f"{b['batching on']['transport']}, server on {b['batching on']['server_device']})", "",
          "| setting | req/s | tokens/s | kernel launches / request | mean requests / launch | p50 ms | p99 ms | "
          "server CPU ms / request | host CPU busy | errors |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("batching on", "batching off"):
        x = b[name]
        L.append(f"| {name} | {x['requests_per_s']:.2f} | {x['tokens_per_s']:.0f} | {x['launches_per_request']:.3f} | "
                 f"{x['mean_batch_requests']:.2f} | {x['latency_ms']['p50']:.0f} | {x['latency_ms']['p99']:.0f} | "
                 f"{x.get('server_cpu_ms_per_request', float('nan')):.2f} | "
                 f"{x.get('host_cpu_busy_fraction', float('nan')):.0%} | {x['error_count']} |")
    L.append(f"\nthroughput on / off: {b['throughput_ratio']:.2f}x")
    if b.get("round_ratios"):
        L.append("by round (on / off req/s): " + ", ".join(
            f"{on:.0f} / {off:.0f} = {on / off:.2f}x" for on, off in zip(b["batching on"]["rounds_requests_per_s"],
                                                                        b["batching off"]["rounds_requests_per_s"])))
        L.append("(req/s over all rounds; latency percentiles: the median of the rounds')")
    L += ["", "Median ms per request by server stage (flashserve bench); outside = round trip minus the stages "
          "(client work, gRPC both ways, validation, waits for a thread):", "",
          "| setting | receive | queue | copy in | compute | copy out | outside |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("batching on", "batching off"):
        st = b[name].get("stage_ms_p50", {})
        L.append(f"| {name} | " + " | ".join(f"{st.get(k, float('nan')):.2f}" for k in
                                          ("receive", "queue", "copy_in", "compute", "copy_out", "outside")) + " |")
    if "server_ms_per_request" in b["batching on"]:
        L += ["", "Server time per request (ms; event loop = the main threads' CPU, all server processes; of it, the "
              "GPU process's loop (the server itself, or the engine of --frontends); worker = compute threads' wall "
              "time inside launches, split into their CPU, waits for the GPU, and the rest: runnable but not "
              "running, i.e. the GIL or a busy host); workers busy = mean number of busy compute workers:", "",
              "| setting | event loop CPU | of it GPU process | other threads CPU | worker busy | worker CPU | "
              "worker GPU wait | worker other | workers busy |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("batching on", "batching off"):
            m = b[name]["server_ms_per_request"]
            L.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in (
                "event_loop_cpu", "gpu_process_loop_cpu", "other_threads_cpu", "worker_busy", "worker_cpu",
                "worker_gpu_wait", "worker_other")) + f" | {b[name]['worker_utilisation']:.2f} |")
    return L


def _residuals_markdown(r):
    rb = r["residuals"]
    L = ["", f"## 4. Residuals: wire bytes of one training step ({rb['shape']}, gRPC chunks)", "",
          "| | up (client to server) | down | total |", "| --- | ---: | ---: | ---: |",
          f"| forward (keep residuals) | {rb['forward_up']:,} | {rb['forward_down']:,} | "
          f"{rb['forward_up'] + rb['forward_down']:,} |",
          f"| backward with handle (dout only) | {rb['backward_kept_up']:,} | {rb['backward_kept_down']:,} | "
          f"{rb['backward_kept_up'] + rb['backward_kept_down']:,} |",
          f"| backward resending everything | {rb['backward_resend_up']:,} | {rb['backward_resend_down']:,} | "
          f"{rb['backward_resend_up'] + rb['backward_resend_down']:,} |", "",
          f"fwd+bwd / fwd: upload {rb['step_vs_forward_upload_kept']:.2f}x with residuals "
          f"({rb['step_vs_forward_upload_resend']:.2f}x resending); both directions "
          f"{rb['step_vs_forward_total_kept']:.2f}x ({rb['step_vs_forward_total_resend']:.2f}x resending)."]
    L += ["", "## 5. Server-side time split (best of 3, one request at a time)", "",
          "| request | total ms | receive ms | queue ms | copy in ms | compute ms | copy out ms | wire + rest ms |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, t in r["time_split"].items():
        L.append(f"| {name} | {t['total_ms']:.1f} | {t['receive_ms']:.1f} | {t['queue_ms']:.2f} | {t['copy_in_ms']:.2f} | "
                 f"{t['compute_ms']:.1f} | {t['copy_out_ms']:.2f} | {t['wire_and_rest_ms']:.1f} |")
    L += ["", "receive = first frame to last input byte on the server (part of the wire); wire + rest = total minus "
              "queue, copies and compute (client encode/decode, gRPC both ways, validation)."]
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="sizes up to 64 MB, fewer repeats and requests")
    p.add_argument("--client-heap-keep-mb", type=int, default=256, help="this (client) process keeps freed heap "
                   "memory for reuse from the start, as a flashserve Client does from its first large gRPC-chunk call "
                   "(flashserve.heap; the raw and flashserve calls alike; 0: the allocator's defaults throughout)")
    p.add_argument("--server-heap-keep-mb", type=int, default=None, help="--heap-keep-mb of the flashserve server "
                   "of the payload sweep (default: the server's default)")
    p.add_argument("--repeats", type=int, default=0, help="round trips per payload size and kind, taken in turn "
                   "(0: 9, or 5 with --quick); the medians are reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--concurrency", type=int, default=64, help="clients in the batching comparison")
    p.add_argument("--batch-requests", type=int, default=0, help="requests per batching setting (0: by device)")
    p.add_argument("--skip-batching", action="store_true")
    p.add_argument("--rounds", type=int, default=3,
                   help="batching comparison: rounds of requests per setting, the two servers taking turns")
    p.add_argument("--batching-only", action="store_true", help="only section 3 (batching on / off)")
    p.add_argument("--client-processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes the batching comparison's clients are spread over")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--sizes", help="payload sizes in MB, comma-separated (default: by --quick)")
    p.add_argument("--chunk-bytes", type=int, default=0, help="largest chunk of the gRPC path (0: the client's default)")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--sweep-server-args", default="", help="extra `flashserve serve` flags for the payload sweep's "
                                                           "server, e.g. \"--gil-switch-us 500\"")
    p.add_argument("--server-args", default="", help="extra `flashserve serve` flags for the batching comparison's "
                                                     "servers, e.g. \"--workers 4\"")
    args = p.parse_args(argv)
    if args.raw_server:
        raw_server_main(args.raw_server)
        return 0
    t_start = time.perf_counter()
    import tempfile

    import flashserve

    sizes = [1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 128, 256]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    repeats = args.repeats or (5 if args.quick else 9)
    tmp = tempfile.mkdtemp(prefix="fsbench")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # the flash backend takes 16-bit
    extra = ["--max-concurrent", "256", "--device", args.device]
    from flashserve.heap import keep_freed_memory

    heap_kept = keep_freed_memory(args.client_heap_keep_mb << 20)
    server_heap = [] if args.server_heap_keep_mb is None else ["--heap-keep-mb", str(args.server_heap_keep_mb)]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "device": args.device,
              "versions": {"flashserve": flashserve.__version__, "torch": torch.__version__,
                           "grpcio": grpc.__version__, "python": platform.python_version()},
              "command": "python bench/service.py " + " ".join(a for a in (argv or sys.argv[1:]))}
    if not args.batching_only:
        fs = Proc(["--backend", "auto", "--allow-shm", *extra, *server_heap, *args.sweep_server_args.split()], tmp)
        raw = Proc([], tmp, raw=True)
        try:
            with flashserve.Client(fs.target, timeout=60) as c:
                info = c.server_info()
                report["server"] = {"backend": info.backend, "device": info.device}
            print(f"1-2. payload sweep ({fs.target} vs raw {raw.target}, {info.backend} backend)", flush=True)
            report["repeats"] = repeats
            report["heap"] = {"client_keep_mb": args.client_heap_keep_mb if heap_kept else 0,
                              "server_keep_mb": args.server_heap_keep_mb}
            report["payload"] = payload_sweep(fs.target, raw.target, sizes, repeats, shm_from_mb=64, dtype=dtype,
                                              chunk_bytes=args.chunk_bytes,
                                              heap_keep_bytes=args.client_heap_keep_mb << 20)
            report["chunk_bytes"] = args.chunk_bytes or flashserve.wire.DEFAULT_CHUNK_BYTES
            if info.head_dim_classes and 64 not in info.head_dim_classes:  # a development build of the kernels
                print("4-5. skipped: the server's build lacks head dim 64 (FLASHSERVE_HEADDIMS)", flush=True)
            else:
                print("4. residual wire bytes", flush=True)
                report["residuals"] = residual_bytes(fs.target)
                print("5. time split", flush=True)
                report["time_split"] = time_split(fs.target, dtype)
        finally:
            fs.stop()
            raw.stop()
    if not args.skip_batching:
        n = args.batch_requests or (2048 if args.device == "cuda" else (64 if args.quick else 128))
        print(f"3. batching on/off ({args.concurrency} clients, {args.rounds} rounds of {n} requests each setting)",
              flush=True)
        report["batching"] = batching_pair(tmp, args.device, args.concurrency, n,
                                           ["--max-concurrent", str(max(256, 2 * args.concurrency)),
                                            *args.server_args.split()],
                                           processes=args.client_processes, rounds=args.rounds)
    if "server" not in report and report.get("batching"):
        on = report["batching"]["batching on"]
        report["server"] = {"backend": on["server_backend"], "device": on["server_device"]}
    report["total_s"] = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"service_{args.device}_{report['date'][:10]}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(report))
    print(f"wrote {stem}.json and {stem}.md ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
