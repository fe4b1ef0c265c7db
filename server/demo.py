"""`flashserve demo`: the whole path on this machine, checked.

Starts a server on a free loopback port with the best backend here (our kernels on a GPU with
the extension built, torch ops otherwise), runs a transformer-shaped attention workload (several
varlen sequences, grouped-query heads, causal) forward and backward through the flash_attn-style
client, compares with a float64 reference, and prints a short table."""
from __future__ import annotations

import statistics
import time

import torch

import flashserve
from flashserve.autograd import make_params

from .app import BackgroundServer
from .backends import AttentionParams, reference
from .config import ServerConfig

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}  # max error / max |ref|


def _workload(on_gpu: bool, quick: bool):
    if on_gpu and not quick:
        return [1, 17, 128, 1000, 2048, 4097], 16, 4, 128
    if quick:
        return [1, 17, 64, 100], 4, 2, 64
    return [1, 17, 128, 256, 300], 8, 2, 64


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12))


def run_demo(backend: str = "auto", dtype: str | None = None, quick: bool = False) -> int:
    on_gpu = torch.cuda.is_available()
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_gpu else torch.float32)
    lengths, heads, heads_k, dim = _workload(on_gpu, quick)
    config = ServerConfig(host="127.0.0.1", port=0, backend=backend, allow_shm=True)  # same host: shared memory
    device = "cuda" if on_gpu else "cpu"
    gen = torch.Generator().manual_seed(1234)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total, longest = int(cu[-1]), max(lengths)
    q = torch.randn(total, heads, dim, generator=gen).to(device, dt).requires_grad_(True)
    k = torch.randn(total, heads_k, dim, generator=gen).to(device, dt).requires_grad_(True)
    v = torch.randn(total, heads_k, dim, generator=gen).to(device, dt).requires_grad_(True)
    dout = torch.randn(total, heads, dim, generator=gen).to(device, dt)
    with BackgroundServer(config) as server:
        client = flashserve.Client(server.target, timeout=600)
        info = client.server_info()
        fwd_times, bwd_times = [], []
        # Two untimed rounds first: the client's shared-memory regions (one set per in-flight autograd graph)
        # are created, mapped and, on a GPU, page-locked on first use; the timed rounds show the steady state.
        for round_ in range(2 + 3):
            t0 = time.perf_counter()
            out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True, client=client)
            t1 = time.perf_counter()
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            t2 = time.perf_counter()
            if round_ >= 2:
                fwd_times.append(t1 - t0)
                bwd_times.append(t2 - t1)
        timings = client.last_timings
        # The LSE, from the packed-layout call (return_attn_probs would also ship the full probability
        # matrix, which flash_attn returns only for testing: gigabytes at these lengths).
        _, plain = client.forward(q.detach(), k.detach(), v.detach(), cu, cu,
                                  make_params(None, True, (-1, -1), 0.0, 0.0, 0, 0, False, longest, longest, False))
        lse = plain["softmax_lse"]
        transport = "shared memory" if client.uses_shm() else "gRPC chunks"
        client.close()
    params = AttentionParams(softmax_scale=dim ** -0.5, causal=True, max_seqlen_q=longest, max_seqlen_k=longest)
    args = [t.detach().cpu().double() for t in (q, k, v)]
    ref = reference.forward(*args, cu, cu, params, compute_dtype=torch.float64)
    grads = reference.backward(dout.cpu().double(), *args, ref.out, ref.softmax_lse, cu, cu, params,
                               compute_dtype=torch.float64)
    errors = {"out": _rel_err(out.detach().cpu(), ref.out), "lse": _rel_err(lse.cpu(), ref.softmax_lse),
              "dq": _rel_err(dq.cpu(), grads.dq), "dk": _rel_err(dk.cpu(), grads.dk), "dv": _rel_err(dv.cpu(), grads.dv)}
    worst = max(errors.values())
    ok = worst <= TOLERANCE[dt]
    fwd, bwd = statistics.median(fwd_times), statistics.median(bwd_times)
    flops = sum(4 * heads * n * n * dim / 2 for n in lengths)  # causal
    payload = sum(t.numel() * t.element_size() for t in (q, k, v, out))
    rows = [
        ("server backend", f"{info.backend} ({info.device})"),
        ("client device", f"{device}, transport {transport}"),
        ("workload", f"varlen lengths {lengths}, causal, {heads} q heads / {heads_k} kv heads, head dim {dim}, "
                     f"{str(dt).replace('torch.', '')}"),
        ("forward round trip", f"{fwd * 1e3:.1f} ms median of 3 after 2 warm-up rounds ({total / fwd:,.0f} tokens/s, "
                               f"{payload / fwd / 1e6:,.0f} MB/s payload)"),
        ("backward round trip", f"{bwd * 1e3:.1f} ms median of 3"),
        ("server compute (last bwd)", f"{timings.compute_s * 1e3:.2f} ms ({flops * 2.5 / max(timings.compute_s, 1e-9) / 1e12:.2f} TFLOP/s)"),
        ("max error / max |ref|", ", ".join(f"{k} {v:.1e}" for k, v in errors.items())),
        ("check", f"{'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE[dt]:.0e} for {str(dt).replace('torch.', '')})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("flashserve demo")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if ok else 1
