"""`serve --frontends 2` on the GPU: the engine process computes with the best backend (our kernels when built) and
reads page-locked shared memory straight into its GPU copies; results match torch on both transports, forward and
backward, with the clients of both front ends batched by the one engine."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import torch

import flashserve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(port: int, pattern: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_frontends_on_cuda():
    metrics = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashserve.server.cli", "serve", "--port", "0", "--frontends", "2",
                             "--backend", "auto", "--device", "cuda", "--allow-shm", "--metrics-port", str(metrics),
                             "--batch-delay-us", "5000", "--drain-s", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, target, seen = [], None, set()
    try:
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"\[(\d+)\] flashserve listening on ([\d.]+):(\d+)", line)
            if m:
                seen.add(m.group(1))
                target = f"{m.group(2)}:{m.group(3)}"
        assert len(seen) == 2, "".join(lines)
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        errors = []
        start = threading.Barrier(8)

        def worker(i):
            try:
                with flashserve.Client(target, timeout=120, transport="shm" if i % 2 else "bytes") as c:
                    c.server_info()  # connected first: the requests then arrive together and can share launches
                    start.wait(60)
                    g = torch.Generator().manual_seed(i)
                    q, k, v = (torch.randn(2, 300 + 40 * i, 4, 64, generator=g).to(torch.bfloat16).requires_grad_()
                               for _ in range(3))
                    out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
                    out.float().sum().backward()
                    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        *(t.transpose(1, 2) for t in leaves), is_causal=True).transpose(1, 2)
                    ref.sum().backward()
                    assert (out.float() - ref).abs().max().item() < 2e-2
                    for got, want in zip((q.grad, k.grad, v.grad), leaves):
                        assert (got.float() - want.grad).abs().max().item() < 5e-2
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        launches = _metric(metrics, r"^flashserve_kernel_launches_total (\S+)$")
        assert 0 < launches < 16  # 8 forwards + 8 backwards, some sharing a launch
        assert _metric(metrics, r'^flashserve_shm_bytes_total\{direction="in"\} (\S+)$') > 0  # the engine read shm
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
