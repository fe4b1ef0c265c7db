"""`flashserve serve --processes N`: N server processes sharing one TCP port (SO_REUSEPORT).

One Python process serves a few hundred small requests per second: its event loop and compute threads share one
GIL (measured on an H200 host: bench/results/service_cuda_2026-12-03_h200_session6.md). N processes, each with
its own loop, compute workers, batching and backend on the same device, are meant to serve up to N times that,
until the device or the host's cores are the limit (not yet measured on a GPU). The kernel spreads new connections over the processes; a client's channel keeps
its connection, so a Backward that names residuals reaches the process that kept them (after a reconnect the
server answers FAILED_PRECONDITION and the client resends the tensors, as after an eviction).

The supervisor holds no device and serves nothing itself: it reserves the port, starts the processes with the same
settings (passed as FLASHSERVE_* variables; process i gets --metrics-port + i), relays their output, forwards
SIGTERM / SIGINT (each process drains its calls), and restarts a process that dies, unless it dies right after
starting twice in a row (a setting that cannot work), which stops them all.

The same Supervisor runs the gRPC front ends of `serve --frontends N` (server/engine.py) from the GPU process."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

from .app import REUSEPORT_ENV
from .config import ServerConfig

log = logging.getLogger(__name__)

QUICK_EXIT_S = 10.0  # a process that exits this soon after starting, twice in a row, stops the supervisor


def child_environment(config: ServerConfig, index: int, port: int, metrics_offset: int = 0,
                      extra: Optional[dict] = None) -> dict:
    """The settings of process `index` as FLASHSERVE_* variables (a child reads them with no flags given)."""
    env = dict(os.environ)
    for f in dataclasses.fields(ServerConfig):
        env[ServerConfig.env_name(f.name)] = str(getattr(config, f.name))
    env[ServerConfig.env_name("processes")] = "1"
    env[ServerConfig.env_name("frontends")] = "0"
    env[ServerConfig.env_name("port")] = str(port)
    if config.metrics_port:
        env[ServerConfig.env_name("metrics_port")] = str(config.metrics_port + metrics_offset + index)
    if not config.cpu_threads:  # a CPU backend's share of the cores, now split over the processes too
        share = (os.cpu_count() or 1) // max(1, config.workers * config.processes)
        env[ServerConfig.env_name("cpu_threads")] = str(max(1, share))
    env[REUSEPORT_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port (port 0: a free one), so that the processes can
    all bind the same port and nothing else takes it meanwhile. A plain bind first checks that nothing uses the
    port: SO_REUSEPORT alone would let a second supervisor of the same user silently share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))  # OSError (EADDRINUSE) when anything holds the port
        port = probe.getsockname()[1]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


class Supervisor:
    """Runs `count` server processes on one reserved port (`serve --processes N`, or the front ends of
    `serve --frontends N`: then `metrics_offset` 1, since the engine serves metrics on --metrics-port, and `extra`
    names the engine's socket)."""

    def __init__(self, config: ServerConfig, count: Optional[int] = None, metrics_offset: int = 0,
                 extra: Optional[dict] = None):
        count = config.processes if count is None else count
        if count < 1 or (extra is None and count < 2):
            raise ValueError("Supervisor runs 2 or more processes (1 or more front ends)")
        if config.unix_socket:
            raise SystemExit("--unix-socket cannot be shared by several processes: use one process, or TCP only")
        self.config = config
        self.count = count
        self.metrics_offset = metrics_offset
        self.extra = extra
        self.procs: List[Optional[subprocess.Popen]] = [None] * count
        self.started = [0.0] * count
        self.quick_exits = [0] * count
        self.stopping = threading.Event()
        self.port = 0
        self.reserved: Optional[socket.socket] = None

    def _start(self, i: int) -> None:
        env = child_environment(self.config, i, self.port, self.metrics_offset, self.extra)
        proc = subprocess.Popen([sys.executable, "-m", "flashserve.server.cli", "serve"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs[i], self.started[i] = proc, time.monotonic()
        threading.Thread(target=self._relay, args=(i, proc), daemon=True).start()

    @staticmethod
    def _relay(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(f"[{i}] {line}")
            sys.stdout.flush()

    def _stop_all(self, sig=signal.SIGTERM) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(sig)

    def start(self) -> int:
        """Reserve the port and start the processes; returns the port."""
        try:
            self.reserved = reserve_port(self.config.host, self.config.port)
        except OSError as exc:
            raise SystemExit(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        self.port = self.reserved.getsockname()[1]
        for i in range(self.count):
            self._start(i)
        return self.port

    def watch(self) -> bool:
        """Restart processes that die until `stopping` is set; True when one kept dying right after its start."""
        while not self.stopping.wait(0.5):
            for i, p in enumerate(self.procs):
                if p is None or p.poll() is None:
                    continue
                quick = time.monotonic() - self.started[i] < QUICK_EXIT_S
                self.quick_exits[i] = self.quick_exits[i] + 1 if quick else 0
                if self.quick_exits[i] >= 2:
                    log.error("process %d exited twice right after starting (code %s); stopping", i, p.returncode)
                    self.stopping.set()
                    return True
                log.warning("process %d exited with code %s; restarting it", i, p.returncode)
                self._start(i)
        return False

    def shutdown(self) -> None:
        """SIGTERM every process (each drains its calls) and wait for them."""
        self.stopping.set()
        if self.reserved is not None:
            self.reserved.close()
        self._stop_all()
        deadline = time.monotonic() + self.config.drain_s + 10
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self) -> int:
        port = self.start()
        print(f"flashserve supervisor: {self.count} processes on {self.config.host}:{port}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            failed = self.watch()
        finally:
            self.shutdown()
        return 1 if failed else 0


def serve_processes(config: ServerConfig) -> int:
    return Supervisor(config).run()
