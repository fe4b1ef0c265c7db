"""The request rate grpcio's Python server reaches with no work at all: the ceiling any Python-served RPC has.

    python bench/grpc_floor.py [--concurrency 64] [--processes 8] [--seconds 5] [--payload 600]

A grpc.aio server (this process, one event loop, like flashserve's) answers a unary method by returning the
request bytes; clients in --processes processes keep --concurrency calls in flight in all, each call carrying
--payload bytes (about the size of a shared-memory Call header). Prints requests/s and the server's CPU
seconds per request. Compare with `flashserve bench` against a real server (bench/profile_service.py)."""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import threading
import time

import grpc

METHOD = "/floor.Floor/Echo"


def client(target: str, threads: int, seconds: float, payload: int, start, counts) -> None:
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(METHOD)
    body = b"x" * payload
    done = [0] * threads
    start.wait()
    stop_at = time.perf_counter() + seconds

    def run(i):
        while time.perf_counter() < stop_at:
            call(body, timeout=30)
            done[i] += 1

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    counts.put(sum(done))
    channel.close()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--payload", type=int, default=600)
    a = p.parse_args()

    async def echo(request, context):
        return request

    ready = threading.Event()
    box = {}

    def serve():
        async def run():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "floor.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
            box["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await server.stop(None)
        box["loop"] = asyncio.new_event_loop()
        box["loop"].run_until_complete(run())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait()
    target = f"127.0.0.1:{box['port']}"
    ctx = mp.get_context("spawn")
    start, counts = ctx.Event(), ctx.Queue()
    per = max(1, a.concurrency // a.processes)
    procs = [ctx.Process(target=client, args=(target, per, a.seconds, a.payload, start, counts))
             for _ in range(a.processes)]
    for pr in procs:
        pr.start()
    time.sleep(2.0)  # let the clients import and connect
    c0, t0 = cpu_seconds(), time.perf_counter()
    start.set()
    total = sum(counts.get() for _ in procs)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    for pr in procs:
        pr.join()
    box["loop"].call_soon_threadsafe(box["stop"].set)
    th.join(5)
    print(f"empty unary RPCs, {a.processes * per} in flight from {a.processes} processes, {a.payload} B each: "
          f"{total / dt:.0f} req/s, server CPU {cpu * 1e3 / max(1, total):.3f} ms/request (grpcio {grpc.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
