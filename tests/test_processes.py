"""`flashserve serve --processes N`: several server processes share one port, each request is answered right,
new connections spread over the processes, a dead process is replaced, SIGTERM drains and stops them all, and
settings that cannot work stop the supervisor with a clear message."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

import flashserve
from flashserve.server.config import ServerConfig
from flashserve.server.processes import child_environment
from naive import rel_err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A first port p with p .. p + n - 1 all free now. A server given `--port p --metrics-port p + 1` then binds
    no port the system picks for it (with `--port 0` that pick could be a metrics port chosen before: seen in CI)."""
    for _ in range(100):
        first, socks = free_port(), []
        try:
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def children(pid: int):
    """Live child pids of pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def served(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r'^flashserve_requests_total\{code="OK",method="Forward"\} (\S+)$', text,
                                           re.M))


class Supervised:
    def __init__(self, *flags):
        self.proc = subprocess.Popen([sys.executable, "-m", "flashserve.server.cli", "serve", "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.target = None

    def wait_listening(self, count: int, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        seen = set()
        while len(seen) < count and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.match(r"\[(\d+)\] flashserve listening on ([\d.]+):(\d+)", line)
            if m:
                seen.add(m.group(1))
                self.target = f"{m.group(2)}:{m.group(3)}"
        assert len(seen) == count, "".join(self.lines)
        return self.target

    def wait_replaced(self, dead: int, count: int, timeout: float = 60) -> None:
        """Until the supervisor again runs `count` children, none of them `dead`, and the new one listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (len(children(self.proc.pid)) == count and
                                                   dead not in children(self.proc.pid)):
            time.sleep(0.2)
        self.wait_listening(1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def forward_matches(target: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 24, 2, 32, generator=g) for _ in range(3))
    with flashserve.Client(target, timeout=60) as c:  # one channel, one connection: one process
        out = flashserve.flash_attn_func(q, k, v, causal=True, client=c)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    assert rel_err(out.double(), ref) < 1e-5


def test_processes_share_the_port_and_the_load_and_a_dead_one_is_replaced():
    port = free_port_block(3)  # the service's port, then one metrics port per process
    metrics = port + 1
    sup = Supervised("--processes", "2", "--backend", "torch", "--device", "cpu", "--port", str(port),
                     "--metrics-port", str(metrics), "--drain-s", "2")
    try:
        target = sup.wait_listening(2)
        for i in range(24):  # 24 connections: the chance that one process got none is 2 x 2^-24
            forward_matches(target, i)
        counts = [served(metrics), served(metrics + 1)]
        assert sum(counts) == 24 and min(counts) > 0, counts
        first = children(sup.proc.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)  # a process dies: the others keep serving, it is replaced
        deadline = time.monotonic() + 30
        # until reaped: its "Z" state shows before all its threads have exited and closed the listening socket,
        # and a connection queued on that socket as it closes is reset
        while time.monotonic() < deadline and os.path.exists(f"/proc/{first[0]}"):
            time.sleep(0.05)
        forward_matches(target, 100)
        sup.wait_replaced(first[0], 2)
        assert len(children(sup.proc.pid)) == 2 and first[0] not in children(sup.proc.pid)
        for i in range(8):
            forward_matches(target, 200 + i)
    finally:
        pids = children(sup.proc.pid)
        sup.stop()
    assert sup.proc.returncode == 0
    assert not any(alive(p) for p in pids)


def test_a_setting_that_cannot_work_stops_the_supervisor():
    # the flash backend needs CUDA and the compiled kernels: each process exits right after starting
    sup = Supervised("--processes", "2", "--backend", "flash", "--device", "cpu")
    try:
        assert sup.proc.wait(120) == 1
    finally:
        sup.stop()
    out = sup.proc.stdout.read()
    assert "right after starting" in "".join(sup.lines) + out


def test_a_taken_port_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "serve", "--processes", "2", "--port",
                            str(port), "--backend", "torch", "--device", "cpu"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_unix_socket_cannot_be_shared():
    r = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "serve", "--processes", "2",
                        "--unix-socket", "/tmp/flashserve-test.sock", "--backend", "torch", "--device", "cpu"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--unix-socket cannot be shared" in r.stderr


def test_each_process_gets_the_same_settings():
    cfg = ServerConfig(port=0, processes=3, metrics_port=9100, batch_tokens=123, allow_shm=True, token="s3cret",
                       residual_ttl_s=12.5)
    got = ServerConfig.from_env(child_environment(cfg, 2, 50123))
    want = dataclasses.replace(cfg, processes=1, port=50123, metrics_port=9102,
                               cpu_threads=max(1, (os.cpu_count() or 1) // (cfg.workers * 3)))
    assert got == want
