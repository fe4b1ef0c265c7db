"""The GPU process of `serve --frontends N` end to end on any machine: batching on against off, no GPU, no gRPC.

    python bench/engine_pipeline.py [--clients 64] [--connections 8] [--seconds 6] [--rounds 2] [--profile]

The batching target of issue 5 is bound, on the H200 host, by the GIL of the GPU process (py-spy: its event loop
holds it ~85% of the time under batched load, bench/results/engine_profile_*). bench/engine_requests.py times
only `Engine._run` with the scheduler stubbed; this runs the whole process as it serves: a real `Engine` on its
Unix socket, the real `Scheduler` (batching or not, its compute worker threads, `_execute_cuda`'s Python work:
device buffers, per-member slices, output placement straight into the client's region, descriptors), the
messages to and from the front ends, and shared-memory regions per client. Left out (stubbed): the CUDA calls
themselves (buffers on the meta device, copies and stream waits as no-ops, the kernel returns empty tensors).
`--real` (on a GPU): nothing stubbed, the backend `serve` would pick: the GPU process as it serves, with only the
gRPC front ends and the clients stood in for (so what it reaches is that process's own ceiling).
`--serve N --port P`: the whole service instead (`serve --frontends N` with the stubbed CUDA path), for
`flashserve bench 127.0.0.1:P --transport shm ...` to load: where clients and front ends spend their time, on any
machine (bench/results/service_cuda_2026-12-04_h200_session10.md, its CPU section).

A driver process stands in for the front ends: `--connections` sockets to the engine, `--clients` requests kept
in flight (each client with its own input and output memfd regions, as the load generator's clients have), each
answered request sent again at once. Reported per setting: requests/s, launches per request, and the engine
process's CPU ms per request; then the on / off ratio. Both engines run the whole time and take turns
(`--rounds`), so a busy machine weighs on both alike."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List

import torch

from flashserve import shm as client_shm
from flashserve.server.engine import Engine, _Messages

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_requests import make_payload, stand_in_pinner  # noqa: E402 - bench/engine_requests.py


# ---- the engine process --------------------------------------------------------------------------
class _NoStream:
    """Stands in for a CUDA stream: `torch.cuda.stream(None)` is a no-op context, waits do nothing."""

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _stub_cuda(scheduler_module) -> None:
    """Run `_execute_cuda` with no GPU: buffers on the meta device, copies, streams and waits as no-ops."""
    streams = (_NoStream(), _NoStream(), _NoStream())
    type(scheduler_module._STREAMS).get = lambda self, device: streams  # (a thread-local: patch its class)
    scheduler_module._wait = lambda stream: None
    scheduler_module._copy_all = lambda dsts, srcs: None
    no_stream = scheduler_module.torch.cuda.stream(None)  # a no-op context on any build
    scheduler_module.torch.cuda.stream = lambda s: no_stream
    real = scheduler_module._execute_cuda

    def execute_batch(backend, jobs, stats=None):  # execute_batch's CUDA branch, whatever the device says
        stats = stats or scheduler_module.Stats()
        results = real(backend, jobs, stats)
        scheduler_module.metrics.BATCH_REQUESTS.observe(len(jobs))
        return results

    scheduler_module.execute_batch = execute_batch


class _MetaBackend:
    """A forward-only backend whose outputs are empty meta tensors of the right shapes (no compute)."""

    name = "meta-stub"
    device = torch.device("meta")

    def capabilities(self):
        from flashserve.server.backends.torch_backend import TorchBackend
        return TorchBackend("cpu").capabilities()

    def device_name(self) -> str:
        return "none (stubbed)"

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None, return_softmax=False):
        from flashserve.server.backends.base import ForwardResult
        out = torch.empty(tuple(q.shape), dtype=q.dtype, device="meta")
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device="meta")
        return ForwardResult(out=out, softmax_lse=lse)


def engine_main(path: str, batching: bool, workers: int, real: bool) -> None:
    from flashserve.server import scheduler as scheduler_module
    from flashserve.server.app import build_service
    from flashserve.server.backends import create_backend
    from flashserve.server.config import ServerConfig
    from flashserve.server.shm import ShmTransport

    flags = dict(batch_tokens=32768, batch_delay_us=500) if batching else dict(batch_tokens=0)
    if real:  # the GPU process as `serve --frontends N --allow-shm` builds it
        cfg = ServerConfig(allow_shm=True, backend="auto", device="cuda", workers=workers, **flags)
        service = build_service(cfg, create_backend("auto", "cuda"))
    else:
        _stub_cuda(scheduler_module)
        cfg = ServerConfig(allow_shm=True, backend="torch", device="cpu", workers=workers, **flags)
        service = build_service(cfg, _MetaBackend())
        # a CUDA server's shared memory: regions page-locked (a stand-in registrar), inputs borrowed, outputs placed
        service.shm = ShmTransport(None, stand_in_pinner())
        service.pool = None

    async def serve():
        engine = Engine(service)
        await engine.start(path)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the driver closes stdin
        await engine.close()
        print(json.dumps(service.scheduler.stats.snapshot()), flush=True)

    asyncio.run(serve())


def serve_stub(frontends: int, port: int, batching: bool, workers: int) -> int:
    """`serve --frontends N` for real (gRPC front-end processes, the engine, the scheduler) with this file's stubbed
    CUDA path as its backend: the whole service on any machine, for `flashserve bench` to load. Runs until
    SIGINT / SIGTERM."""
    import signal

    from flashserve.server import app
    from flashserve.server import scheduler as scheduler_module
    from flashserve.server.config import ServerConfig
    from flashserve.server.shm import ShmTransport

    _stub_cuda(scheduler_module)
    build_service = app.build_service

    def build_stub_service(config, backend, engine=None):  # the engine's: a CUDA server's shared memory, stood in
        service = build_service(config, backend, engine)
        if engine is None:
            service.shm = ShmTransport(None, stand_in_pinner())
            service.pool = None
        return service

    app.build_service = build_stub_service
    flags = dict(batch_tokens=32768, batch_delay_us=500) if batching else dict(batch_tokens=0)
    cfg = ServerConfig(allow_shm=True, backend="torch", device="cpu", frontends=frontends, port=port,
                       workers=workers, max_concurrent=256, **flags)

    async def run():
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        return await app.serve_engine(cfg, _MetaBackend(), stop)

    return asyncio.run(run())


# ---- the driver (front ends and clients) ------------------------------------------------------------
def client_payloads(clients: int, regions: List[tuple]) -> List[dict]:
    """One engine "run" message per client, as a front end makes it (engine_requests.make_payload's request)."""
    from flashserve.server.app import build_service
    from flashserve.server.backends.torch_backend import TorchBackend
    from flashserve.server.config import ServerConfig

    cfg = ServerConfig(allow_shm=True, backend="torch", device="cpu")
    service = build_service(cfg, TorchBackend("cpu"))
    return [make_payload(cfg, service, pair) for pair in regions[:clients]]


async def drive(path: str, payloads: List[dict], connections: int, seconds: float, warmup: float,
                engine_pid: int) -> dict:
    """Keep every client's request in flight for `seconds` (after `warmup` seconds); count answers and batch sizes,
    and the engine process's CPU seconds over the timed window."""
    loop = asyncio.get_running_loop()
    state = dict(timing=False, answers=0, launches=0.0, errors=0, stop=False)
    conns = []
    owner = {}  # request id -> (connection index, client index)
    ids = iter(range(1, 1 << 62))

    def make(ci: int):
        inflight = [0]

        def on_message(message) -> None:
            rid, ok, result = message
            c = owner.pop(rid)[1]
            inflight[0] -= 1
            if state["timing"]:
                state["answers"] += 1
                if ok:
                    state["launches"] += 1.0 / result["timings"].get("batch_requests", 1)
                else:
                    state["errors"] += 1
                    state.setdefault("first_error", result)
            if not state["stop"]:
                send(ci, c)

        proto = _Messages(on_message, lambda: None)
        return proto, inflight

    def send(ci: int, c: int) -> None:
        proto, inflight = conns[ci]
        rid = next(ids)
        owner[rid] = (ci, c)
        inflight[0] += 1
        proto.send((rid, "run", dict(payloads[c], in_flight=inflight[0])))

    for ci in range(connections):
        proto, inflight = make(ci)
        await loop.create_unix_connection(lambda p=proto: p, path)
        conns.append((proto, inflight))
    for c in range(len(payloads)):
        send(c % connections, c)
    await asyncio.sleep(warmup)  # mappings, view caches, allocator
    state["timing"] = True
    t0, cpu0 = time.perf_counter(), _cpu_s(engine_pid)
    await asyncio.sleep(seconds)
    state["timing"] = False
    dt, cpu = time.perf_counter() - t0, _cpu_s(engine_pid) - cpu0
    state["stop"] = True
    for _ in range(200):  # let the requests in flight come back
        if not owner:
            break
        await asyncio.sleep(0.05)
    for proto, _ in conns:
        proto.close()
    if state["errors"]:
        print("    first error:", state["first_error"], flush=True)
    return dict(seconds=dt, answers=state["answers"], launches=state["launches"], errors=state["errors"], cpu_s=cpu)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--connections", type=int, default=8, help="front-end connections to the engine")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each timed window")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workers", type=int, default=2, help="the engine's compute threads")
    p.add_argument("--profile", action="store_true", help="cProfile the batching-on engine (its main thread)")
    p.add_argument("--real", action="store_true", help="the real backend and CUDA path (needs a GPU): only the "
                   "front ends and clients are stood in for")
    p.add_argument("--verbose", action="store_true", help="print each engine's scheduler counters")
    p.add_argument("--pyspy", metavar="FILE", help="py-spy (GIL holders, by thread) of the batching-on engine's "
                   "first timed round, raw format, into FILE")
    p.add_argument("--serve", type=int, metavar="N", default=0, help="instead: run `serve --frontends N` with the "
                   "stubbed CUDA path as its backend on --port, until interrupted (for `flashserve bench`)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--no-batching", action="store_true", help="with --serve: one request per launch")
    p.add_argument("--engine", nargs=2, metavar=("PATH", "BATCHING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        path, batching = args.engine[0], args.engine[1] == "on"
        if os.environ.get("ENGINE_PIPELINE_PROFILE") and batching:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            try:
                engine_main(path, batching, args.workers, args.real)
            finally:
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        else:
            engine_main(path, batching, args.workers, args.real)
        return 0

    if args.serve:
        return serve_stub(args.serve, args.port, not args.no_batching, args.workers)
    tmp = tempfile.mkdtemp(prefix="engine-pipeline-")
    env = dict(os.environ, ENGINE_PIPELINE_PROFILE="1" if args.profile else "")
    engines = {}
    for name in ("on", "off"):
        path = os.path.join(tmp, f"{name}.sock")
        proc = subprocess.Popen([sys.executable, __file__, "--engine", path, name, "--workers", str(args.workers)]
                                + (["--real"] if args.real else []),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        engines[name] = (proc, path)
        for line in proc.stdout:  # (a backend may log first)
            if line.strip() == "ready":
                break
        else:
            raise SystemExit(f"the batching-{name} engine exited before it was ready (code {proc.wait()})")
    regions = [(client_shm.Region(4 << 20, memfd=True), client_shm.Region(2 << 20, memfd=True))
               for _ in range(args.clients)]
    acc = {name: dict(seconds=0.0, answers=0, launches=0.0, errors=0, cpu_s=0.0) for name in engines}
    try:
        payloads = client_payloads(args.clients, regions)
        for r in range(args.rounds):
            for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                proc, path = engines[name]
                spy = None
                if args.pyspy and name == "on" and r == 0:
                    spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--duration",
                                            str(int(args.seconds)), "--rate", "250", "--format", "raw", "--threads",
                                            "--gil", "-o", args.pyspy], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                res = asyncio.run(drive(path, payloads, args.connections, args.seconds, args.warmup, proc.pid))
                if spy is not None:
                    spy.wait(60)
                a = acc[name]
                for k in a:
                    a[k] += res[k]
                print(f"  round {r + 1} {name:3s}: {res['answers'] / res['seconds']:7.0f} req/s", flush=True)
    finally:
        for proc, _ in engines.values():
            proc.stdin.close()
        for proc, _ in engines.values():
            stats = proc.stdout.read().strip().splitlines()  # the scheduler's counters, last
            proc.wait(30)
            if args.verbose and stats:
                print("   engine stats:", stats[-1])
        for pair in regions:
            for region in pair:
                region.close()
    out = dict(clients=args.clients, connections=args.connections, workers=args.workers, cpus=os.cpu_count(),
               real=args.real, rounds=args.rounds, seconds=args.seconds)
    for name, a in acc.items():
        n = max(1, a["answers"])
        o = out[f"batching {name}"] = dict(requests_per_s=a["answers"] / a["seconds"], requests=a["answers"],
                                           launches_per_request=a["launches"] / n, errors=a["errors"],
                                           engine_cpu_ms_per_request=a["cpu_s"] * 1e3 / n)
        print(f"batching {name:3s}: {o['requests_per_s']:7.0f} req/s, {o['launches_per_request']:.3f} launches/"
              f"request, errors {a['errors']}, engine process CPU {o['engine_cpu_ms_per_request']:.3f} ms/request")
    out["ratio"] = out["batching on"]["requests_per_s"] / max(1e-9, out["batching off"]["requests_per_s"])
    print(f"on / off: {out['ratio']:.2f}x  ({args.clients} clients, {args.connections} connections, "
          f"{args.workers} workers, {os.cpu_count()} cpus)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
