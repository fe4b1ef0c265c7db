"""The per-request Python cost of the GPU process of `serve --frontends N`, without a GPU or front ends.

    python bench/engine_requests.py [--requests 2000] [--profile]

Drives `Engine._run` (server/engine.py) in-process with the batching benchmark's request (512 tokens x 16 heads x
64, bf16, q/k/v and the outputs in shared-memory regions) and the launch stubbed out, so what is timed is the work
batching cannot share: the hand-over's tensors, shared-memory views and page-lock holds, job bookkeeping, the
outputs' descriptors (the scheduler's queue and the messages to the front ends are not included; the whole process,
scheduler and messages included, is bench/engine_pipeline.py). It is most of the GPU process's event-loop time under
batched load (bench/results/engine_profile_2026-12-03_h200_session7.txt); this measures it on any machine, before and
after a change. `--profile`: the top functions by own time.
`--gil-contention`: the same with a Python-busy thread beside it; each call on the path that releases the GIL (most
torch ops do; tensor indexing, torch.from_numpy and numpy do not) then waits for the GIL, which is what such calls
cost in the GPU process, where the event loop and the compute workers contend for it."""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time

import torch

from flashserve import shm as client_shm
from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.server.app import build_service
from flashserve.server.backends.torch_backend import TorchBackend
from flashserve.server.config import ServerConfig
from flashserve.server.engine import Engine, run_payload
from flashserve.server.shm import HostPinner
from flashserve.server.validation import attention_params, check_header


def stand_in_pinner() -> HostPinner:
    """A CUDA server's page-locking of client regions, without a GPU: every region counts as pinned."""
    return HostPinner(1 << 40, register=lambda addr, size: True, unregister=lambda addr, size: None)


def make_engine(cuda_like: bool = True):
    """An engine whose launch is stubbed. cuda_like: the shared-memory path of a CUDA server (regions "page-locked"
    by a stand-in registrar, inputs borrowed, outputs placed where the GPU's direct copy would put them; the
    copies themselves, DMA on a GPU, are left out); else a CPU server's (outputs copied into the region)."""
    cfg = ServerConfig(allow_shm=True, backend="torch", device="cpu")
    service = build_service(cfg, TorchBackend("cpu"))
    if cuda_like:
        service.shm.pinner = stand_in_pinner()
        service.pool = None  # a CUDA server has no receive-buffer pool: page-locked borrowing instead
    lse = torch.zeros(16, 512)

    async def launch_stub(job):  # what the compute worker does around a launch, minus the launch
        outputs = {"out": job.tensors["q"], "softmax_lse": lse}
        if job.output_dest is not None:  # where the device-to-host copy would land
            placed = {name: job.output_dest(name, t) for name, t in outputs.items()}
            outputs = {name: t if placed[name] is None else placed[name] for name, t in outputs.items()}
        if job.finish is not None:
            job.finish(outputs)
        return outputs

    service.scheduler.run = launch_stub
    return cfg, service, Engine(service)


def make_payload(cfg, service, regions):
    q = torch.randn(512, 16, 64).bfloat16()
    cu = torch.tensor([0, 512], dtype=torch.int32)
    named = [("q", q), ("k", q), ("v", q), ("cu_seqlens_q", cu), ("cu_seqlens_k", cu)]
    header = pb.Header(operation=pb.FORWARD, params=pb.AttentionParams(max_seqlen_q=512, max_seqlen_k=512),
                       tensors=[wire.describe(n, t) for n, t in named])
    inputs, outputs = regions
    pos = 0
    for d, (_, t) in zip(header.tensors, named):
        d.shm.region, d.shm.offset = inputs.name, pos
        pos += client_shm.align(inputs.put(t, pos))
    header.output_region = outputs.name
    shapes = check_header(header, pb.FORWARD, service.caps, cfg, False)
    params = attention_params(header, 64, service.caps, pb.FORWARD)
    small = {"cu_seqlens_q": cu, "cu_seqlens_k": cu}  # validated by value on the front end
    return run_payload(pb.FORWARD, header, small, shapes, params, {"q", "k", "v"}, 0.0, None, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cpu-path", action="store_true", help="a CPU server's path (outputs copied) instead")
    p.add_argument("--gil-contention", action="store_true",
                   help="run a Python-busy thread beside it, as the GPU process's compute workers are: every call "
                        "that releases the GIL then costs a wait for it (up to the switch interval, 5 ms), and "
                        "--profile shows which calls those are")
    args = p.parse_args()
    if args.gil_contention:
        import threading

        def busy():
            while True:
                sum(range(1000))

        threading.Thread(target=busy, daemon=True).start()
    cfg, service, engine = make_engine(cuda_like=not args.cpu_path)
    regions = (client_shm.Region(8 << 20, memfd=True), client_shm.Region(4 << 20, memfd=True))
    payload = make_payload(cfg, service, regions)

    async def run(n):
        """Seconds for n requests, timed inside one running loop (creating and closing an event loop makes
        socket calls, which release the GIL: beside a busy thread each costs a switch interval)."""
        t0 = time.perf_counter()
        for _ in range(n):
            await engine._run(payload)
        return time.perf_counter() - t0

    async def warm_then_time(n):
        await run(200)  # warm: mappings, caches
        return await run(n)

    try:
        us = asyncio.run(warm_then_time(args.requests)) / args.requests * 1e6
        path = "CPU server's path, 1 MB output copy included" if args.cpu_path else "CUDA server's path, copies excluded"
        print(f"engine per-request work: {us:.1f} us per request ({args.requests} requests; {path})")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(run(args.requests))
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
            print(out.getvalue())
    finally:
        for r in regions:
            r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
