"""`flashserve bench`: load-test a running server with a concurrency sweep.

    flashserve bench 127.0.0.1:50051 --tokens 512 --heads 16 --head-dim 64 --dtype bfloat16 \\
        --op forward --transport auto --concurrency 1,4,16,64 --duration 10 --json out.json --plot out.png

Each concurrency level runs that many client threads (one Client, i.e. one channel and one set of
shared-memory regions, each) sending the same pre-built request in a loop until the level's duration or
request count is reached. Per level: requests/s, tokens/s (query tokens), payload GB/s (tensor bytes
both ways, whatever the transport), p50/p90/p99 latency, errors by gRPC status code, and from the
servers' reply timings the mean requests per kernel launch. `--op forward+backward` times one training
step (forward keeping residuals when the server offers it, then backward). `--processes N` spreads each
level's clients over N client processes: one Python process is bound by its GIL long before a server is."""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from typing import Dict, List

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", default=os.environ.get("FLASHSERVE_TARGET"),
                   help="host:port or unix:/path (default: $FLASHSERVE_TARGET)")
    p.add_argument("--tokens", type=int, default=512, help="query (= key) tokens per request")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (0: same as --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seqs", type=int, default=1, help="sequences per request (packed varlen)")
    p.add_argument("--varlen", action="store_true",
                   help="random sequence lengths (summing to --tokens) instead of equal ones")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--op", choices=("forward", "forward+backward"), default="forward")
    p.add_argument("--transport", choices=("auto", "bytes", "shm"), default="auto",
                   help="auto: shared memory when the server allows it and is on this host")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts to sweep")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (overrides --duration; the level still stops after 10x --duration)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per client before each level")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes to spread each level's clients over (one Python process is GIL-bound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="write results as JSON ('-': stdout)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot throughput and latency vs concurrency")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--token", default=None, help="bearer token (default: $FLASHSERVE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")


def _lengths(tokens: int, seqs: int, varlen: bool, gen: torch.Generator) -> List[int]:
    seqs = max(1, min(seqs, tokens))
    if not varlen:
        base = [tokens // seqs] * seqs
        base[-1] += tokens - sum(base)
        return base
    cuts = sorted(torch.randperm(tokens - 1, generator=gen)[:seqs - 1].add(1).tolist())
    edges = [0] + cuts + [tokens]
    return [b - a for a, b in zip(edges, edges[1:])]


class Workload:
    """One pre-built request (tensors made once; every call sends the same ones)."""

    def __init__(self, tokens=512, heads=16, kv_heads=0, head_dim=64, dtype="bfloat16", seqs=1, varlen=False,
                 causal=False, op="forward", seed=0):
        self.kwargs = dict(tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, seqs=seqs,
                           varlen=varlen, causal=causal, op=op, seed=seed)  # to rebuild it in a worker process
        gen = torch.Generator().manual_seed(seed)
        kv_heads = kv_heads or heads
        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.lengths = _lengths(tokens, seqs, varlen, gen)
        self.tokens, self.op, self.causal = tokens, op, causal
        self.q = torch.randn(tokens, heads, head_dim, generator=gen).to(dt)
        self.k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dt)
        self.v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dt)
        self.dout = torch.randn(tokens, heads, head_dim, generator=gen).to(dt)
        self.cu = torch.tensor([0] + torch.tensor(self.lengths).cumsum(0).tolist(), dtype=torch.int32)
        self.max_seqlen = max(self.lengths)
        self.shape = dict(tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          dtype=str(dt).replace("torch.", ""), seqs=len(self.lengths), varlen=varlen, causal=causal)

    def params(self):
        from flashserve.autograd import make_params

        return make_params(None, self.causal, (-1, -1), 0.0, 0.0, 0, 0, False, self.max_seqlen, self.max_seqlen,
                           False)

    def step(self, client, keep: bool) -> Dict[str, float]:
        """One request (or training step); returns payload bytes and server timings."""
        from flashserve.errors import ResidualsEvicted

        params = self.params()
        before = _moved(client)
        reply, outs = client.forward(self.q, self.k, self.v, self.cu, self.cu, params,
                                     keep_residuals=keep and self.op != "forward")
        timings = [reply.timings]
        if self.op == "forward+backward":
            done = False
            if reply.residual_handle:
                try:
                    r2, _ = client.backward(self.dout, params, residual_handle=reply.residual_handle)
                    done = True
                except ResidualsEvicted:
                    pass
                finally:
                    try:
                        client.release([reply.residual_handle])
                    except Exception:  # noqa: BLE001 - the server evicts by TTL anyway
                        pass
            if not done:
                r2, _ = client.backward(self.dout, params, self.q, self.k, self.v, outs["out"], outs["softmax_lse"],
                                        self.cu, self.cu)
            timings.append(r2.timings)
        return {"bytes": _moved(client) - before,
                "batch_requests": sum(t.batch_requests or 1 for t in timings) / len(timings),
                "stages_s": {stage: sum(getattr(t, stage + "_s") for t in timings) for stage in STAGES}}


# Server-side stages of a request, as its reply's timings report them (seconds). A request's round trip minus
# their sum is the time outside them: the client's own work, gRPC both ways, validation, and any wait for a thread.
STAGES = ("receive", "queue", "copy_in", "compute", "copy_out")


def _moved(client) -> int:
    return client.bytes_sent + client.bytes_received + client.shm_bytes_sent + client.shm_bytes_received


def _percentile(sorted_values: List[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, int(round(p / 100 * (len(sorted_values) - 1)))))
    return sorted_values[idx]


def run_level(make_client, workload: Workload, concurrency: int, duration: float, count: int = 0,
              warmup: int = 1, progress=None) -> Dict[str, object]:
    """One concurrency level; bounded by `count` requests (if > 0) and by time (duration, or 10x it with count)."""
    return summarize([measure(make_client, workload, concurrency, duration, count, warmup, progress)], concurrency,
                     workload.tokens)


def measure(make_client, workload: Workload, concurrency: int, duration: float, count: int = 0,
            warmup: int = 1, progress=None, group=None) -> Dict[str, object]:
    """Run `concurrency` client threads in this process; the raw samples (see summarize).

    `group` = (barrier, issued) when this is one of several processes of a level: the barrier (one party per
    process) holds every process's clock until all of them have their clients connected and warmed up, and the
    shared `issued` counter (a multiprocessing.Value) makes `count` a total over the processes, so that every
    client keeps sending until the level's last request instead of a process stopping at a fixed share. Without
    both, processes that start or finish at different times leave clients idle inside the measured window
    (seen on the GPU host: 8 processes, clients busy 38% of it)."""
    import grpc

    from flashserve.errors import RemoteError

    lock = threading.Lock()
    latencies: List[float] = []
    errors: Dict[str, int] = {}
    examples: Dict[str, str] = {}  # the first message per status code
    moved = [0]
    batch_req: List[float] = []
    compute = [0.0]
    stages: List[List[float]] = []  # per request: its STAGES in seconds, then its round trip
    clients = [make_client() for _ in range(concurrency)]
    keep = [False] * concurrency
    for i, c in enumerate(clients):
        try:
            keep[i] = bool(c.server_info().residuals)
        except RemoteError:
            pass
    time_limit = duration * 10 if count else duration
    start = [0.0]
    # one process alone counts its own requests with the same kind of counter
    group_barrier, issued = group if group is not None else (None, multiprocessing.Value("q", 0))

    def start_clock():
        if group_barrier is not None:  # every process ready: the clocks start together
            group_barrier.wait(GROUP_START_TIMEOUT_S)
        start[0] = time.perf_counter()

    def take_request() -> bool:
        """Claim one of the level's `count` requests (always True without a count)."""
        with issued.get_lock():
            if count and issued.value >= count:
                return False
            issued.value += 1
        return True

    ready = threading.Barrier(concurrency + 1, action=start_clock)

    def worker(i: int):
        # One torch CPU thread per client thread: the clients' copies into shared memory are small and there are
        # many client threads; torch's default (every core, OpenMP threads that spin after each copy) made the
        # load generator burn the host's cores (client CPU 3.1 -> 1.3 ms per 3 MB shm request on 2 cores).
        # OpenMP's thread count is per thread: this leaves the rest of the process as it was.
        torch.set_num_threads(1)
        c = clients[i]
        for _ in range(warmup):
            try:
                workload.step(c, keep[i])
            except RemoteError:
                pass
        ready.wait()
        while True:
            now = time.perf_counter()
            if now - start[0] >= time_limit or not take_request():
                return
            t0 = time.perf_counter()
            try:
                info = workload.step(c, keep[i])
                code = None
            except RemoteError as exc:
                code = exc.code.name if isinstance(exc.code, grpc.StatusCode) else str(exc.code)
                message = exc.details
            except Exception as exc:  # noqa: BLE001 - reported as an error of this request
                code, message = type(exc).__name__, str(exc)
            dt = time.perf_counter() - t0
            with lock:
                if code is None:
                    latencies.append(dt)
                    moved[0] += info["bytes"]
                    batch_req.append(info["batch_requests"])
                    compute[0] += info["stages_s"]["compute"]
                    stages.append([info["stages_s"][k] for k in STAGES] + [dt])
                else:
                    errors[code] = errors.get(code, 0) + 1
                    examples.setdefault(code, message[:300])
            if progress is not None:
                progress(1)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    torch_threads = torch.get_num_threads()
    for t in threads:
        t.start()
    ready.wait()  # after every client's warm-up; the barrier's action starts the clock
    for t in threads:
        t.join(time_limit + 120)
    torch.set_num_threads(torch_threads)  # MKL's count is process-wide: put back what the caller had
    end = time.perf_counter()
    for c in clients:
        c.close()
    # wall-clock start/end so samples from several processes share one time base
    offset = time.time() - time.perf_counter()
    return {"latencies": latencies, "errors": errors, "error_examples": examples, "moved": moved[0],
            "batch_requests": batch_req, "stages": stages,
            "compute_s": compute[0], "start": start[0] + offset, "end": end + offset}


def summarize(samples: List[Dict[str, object]], concurrency: int, tokens: int) -> Dict[str, object]:
    """One level's report from the raw samples of one or more processes."""
    latencies = [x for s in samples for x in s["latencies"]]
    batch_req = [x for s in samples for x in s["batch_requests"]]
    errors: Dict[str, int] = {}
    examples: Dict[str, str] = {}
    for s in samples:
        for code, n in s["errors"].items():
            errors[code] = errors.get(code, 0) + n
        for code, message in s.get("error_examples", {}).items():
            examples.setdefault(code, message)
    moved = [sum(s["moved"] for s in samples)]
    compute = [sum(s["compute_s"] for s in samples)]
    elapsed = max(s["end"] for s in samples) - min(s["start"] for s in samples)
    ok = len(latencies)
    lat = sorted(latencies)
    mean_batch = sum(batch_req) / len(batch_req) if batch_req else 0.0
    rows = [x for s in samples for x in s.get("stages", [])]
    # medians per stage, and of each request's time outside them (its round trip minus their sum)
    stage_ms = {k: _percentile(sorted(r[i] for r in rows), 50) * 1e3 for i, k in enumerate(STAGES)}
    stage_ms["outside"] = _percentile(sorted(r[-1] - sum(r[:-1]) for r in rows), 50) * 1e3
    return {
        "concurrency": concurrency,
        "requests": ok,
        "errors": errors,
        "error_count": sum(errors.values()),
        "error_examples": examples,  # the first message seen per status code
        "duration_s": elapsed,
        "requests_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": ok * tokens / elapsed if elapsed > 0 else 0.0,
        "payload_gb_s": moved[0] / elapsed / 1e9 if elapsed > 0 else 0.0,
        "payload_bytes": moved[0],
        "latency_ms": {"p50": _percentile(lat, 50) * 1e3, "p90": _percentile(lat, 90) * 1e3,
                       "p99": _percentile(lat, 99) * 1e3,
                       "mean": (sum(lat) / ok * 1e3) if ok else float("nan")},
        "mean_batch_requests": mean_batch,
        "launches_per_request": (sum(1 / b for b in batch_req) / len(batch_req)) if batch_req else 0.0,
        "server_compute_s_per_request": compute[0] / ok if ok else 0.0,
        "stage_ms_p50": stage_ms,
    }


def _client_factory(target: str, transport: str, client_kwargs):
    import flashserve

    return functools.partial(flashserve.Client, target, transport=transport, **client_kwargs)


# How long the processes of a level wait for each other to be ready (clients connected, warm-up done).
GROUP_START_TIMEOUT_S = 300.0
_group = None  # this worker process's (barrier, issued counter), set by the pool's initializer


def _join_group(barrier, issued) -> None:
    global _group
    _group = (barrier, issued)


def _process_level(job) -> Dict[str, object]:
    """Worker process entry: rebuild the workload, run this process's share of the clients."""
    target, transport, client_kwargs, workload_kwargs, concurrency, duration, count, warmup = job
    try:
        workload = Workload(**workload_kwargs)
        return measure(_client_factory(target, transport, client_kwargs), workload, concurrency, duration, count,
                       warmup, group=_group)
    except BaseException:
        if _group is not None:  # the others stop waiting for this process at once
            _group[0].abort()
        raise


def _shares(total: int, parts: int) -> List[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_level_processes(target, transport, client_kwargs, workload: Workload, concurrency: int, processes: int,
                        duration: float, count: int, warmup: int) -> Dict[str, object]:
    """One level with its clients spread over worker processes (a Python client process is bound by its GIL
    long before a server is: several processes measure the server, not the load generator). The processes
    start their clocks together and share the request count (see measure)."""
    threads = _shares(concurrency, processes)
    jobs = [(target, transport, client_kwargs, workload.kwargs, t, duration, count, warmup) for t in threads]
    ctx = multiprocessing.get_context("spawn")
    # One process per job, and chunksize 1: a process blocked at the barrier takes no second job.
    with ctx.Pool(len(jobs), initializer=_join_group, initargs=(ctx.Barrier(len(jobs)), ctx.Value("q", 0))) as pool:
        samples = pool.map(_process_level, jobs, chunksize=1)
    return summarize(samples, concurrency, workload.tokens)


def run_sweep(target: str, workload: Workload, levels: List[int], duration: float = 10.0, count: int = 0,
              warmup: int = 1, transport: str = "auto", progress: bool = True, client_kwargs=None,
              processes: int = 1) -> Dict[str, object]:
    client_kwargs = dict(client_kwargs or {})
    make_client = _client_factory(target, transport, client_kwargs)

    with make_client() as probe:
        info = probe.server_info()
        used_shm = probe.uses_shm()
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        total = count * len(levels) if count else None
        bar = tqdm(total=total, unit="req", desc="flashserve bench", file=sys.stderr, dynamic_ncols=True)
    try:
        for c in levels:
            if bar is not None:
                bar.set_postfix_str(f"concurrency {c}")
            if processes <= 1:
                results.append(run_level(make_client, workload, c, duration, count, warmup,
                                         bar.update if bar is not None else None))
            else:
                results.append(run_level_processes(target, transport, client_kwargs, workload, c, processes,
                                                   duration, count, warmup))
                if bar is not None:
                    bar.update(results[-1]["requests"] + results[-1]["error_count"])
    finally:
        if bar is not None:
            bar.close()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "client_host": socket.gethostname(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
        "server": {"version": info.version, "backend": info.backend, "device": info.device,
                   "hostname": info.hostname, "shared_memory": info.shared_memory, "residuals": info.residuals},
        "versions": _versions(),
        "workload": dict(workload.shape, op=workload.op, lengths=workload.lengths),
        "transport": "shm" if used_shm else "bytes",
        "duration_s": duration, "requests_per_level": count, "warmup": warmup, "client_processes": processes,
        "levels": results,
    }


def _versions() -> Dict[str, str]:
    import grpc

    import flashserve

    return {"flashserve": flashserve.__version__, "torch": torch.__version__, "grpcio": grpc.__version__,
            "python": platform.python_version()}


def format_table(report: Dict[str, object]) -> str:
    rows = ["| concurrency | req/s | tokens/s | payload GB/s | p50 ms | p90 ms | p99 ms | req/launch | errors |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["levels"]:
        lat = r["latency_ms"]
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        rows.append(f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                    f"{r['payload_gb_s']:.3f} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | "
                    f"{r['mean_batch_requests']:.2f} | {errs} |")
    rows += ["", "server stages, median ms per request (outside = round trip minus the stages: client, gRPC, waits):",
             "| concurrency | " + " | ".join(STAGES) + " | outside |", "| ---: |" + " ---: |" * (len(STAGES) + 1)]
    for r in report["levels"]:
        st = r.get("stage_ms_p50", {})
        rows.append(f"| {r['concurrency']} | " + " | ".join(f"{st.get(k, float('nan')):.2f}"
                                                             for k in (*STAGES, "outside")) + " |")
    for r in report["levels"]:
        for code, message in sorted(r.get("error_examples", {}).items()):
            rows.append(f"\nconcurrency {r['concurrency']}, first {code}: {message}")
    return "\n".join(rows)


def plot(report: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [r["concurrency"] for r in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(xs, [r["requests_per_s"] for r in levels], "o-", label="requests/s")
    a.set_xlabel("concurrent clients")
    a.set_ylabel("requests/s")
    a.set_xscale("log", base=2)
    a2 = a.twinx()
    a2.plot(xs, [r["payload_gb_s"] for r in levels], "s--", color="tab:orange", label="payload GB/s")
    a2.set_ylabel("payload GB/s")
    a.set_title("throughput")
    for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-")):
        b.plot(xs, [r["latency_ms"][key] for r in levels], style, label=key)
    b.set_xlabel("concurrent clients")
    b.set_ylabel("latency (ms)")
    b.set_xscale("log", base=2)
    b.legend()
    b.set_title("latency")
    w = report["workload"]
    fig.suptitle(f"flashserve bench {report['target']}: {w['op']}, {w['tokens']} tokens x {w['heads']} heads x "
                 f"{w['head_dim']} {w['dtype']}, transport {report['transport']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_from_args(args) -> int:
    if not args.target:
        print("flashserve bench: give a target (host:port or unix:/path) or set FLASHSERVE_TARGET", file=sys.stderr)
        return 2
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        print(f"flashserve bench: --concurrency must be comma-separated integers, got {args.concurrency!r}",
              file=sys.stderr)
        return 2
    if not levels or min(levels) < 1:
        print("flashserve bench: --concurrency needs positive integers", file=sys.stderr)
        return 2
    workload = Workload(args.tokens, args.heads, args.kv_heads, args.head_dim, args.dtype, args.seqs, args.varlen,
                        args.causal, args.op, args.seed)
    token = args.token or os.environ.get("FLASHSERVE_TOKEN") or None
    report = run_sweep(args.target, workload, levels, args.duration, args.requests, args.warmup, args.transport,
                       progress=not args.no_progress,
                       client_kwargs=dict(timeout=args.timeout, token=token, tls=args.tls),
                       processes=max(1, args.processes))
    if args.json_out == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(f"flashserve bench {report['target']} ({report['server']['backend']} on {report['server']['device']}, "
              f"transport {report['transport']}, {report['workload']['op']})")
        print(format_table(report))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0 if all(r["requests"] > 0 for r in report["levels"]) else 1
