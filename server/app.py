"""Assembles the gRPC server: service, health, reflection, auth, TLS, metrics, ports.

`build_server` returns a started `grpc.aio.Server`; `serve` runs one until SIGTERM/SIGINT and
drains in-flight calls; `BackgroundServer` runs one on a thread of its own (tests, `flashserve demo`)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Optional

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flashserve import cuda_host

from . import metrics
from .auth import TokenInterceptor
from .backends import Backend, create_backend
from .config import ServerConfig
from .engine import ENGINE_ENV, Engine, EngineClient, RemoteBackend, frontend_socket_path
from .residuals import ResidualStore
from .scheduler import Scheduler
from .shm import HostPinner, ShmTransport
from .service import SERVICE_NAME, AttentionService, add_to_server

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Running:
    server: grpc.aio.Server
    service: AttentionService
    health: object  # grpc_health.v1.health.aio.HealthServicer
    port: int


REUSEPORT_ENV = "FLASHSERVE_REUSEPORT"


def grpc_options(config: ServerConfig):
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Off, so that a second server on a taken port fails instead of sharing it; on in the processes of
        # `serve --processes N`, which share the port on purpose (server/processes.py sets the variable).
        ("grpc.so_reuseport", 1 if os.environ.get(REUSEPORT_ENV) == "1" else 0),
    ]


def make_scheduler(backend: Backend, config: ServerConfig) -> Scheduler:
    return Scheduler(backend, config.workers, batch_tokens=config.batch_tokens, batch_delay_us=config.batch_delay_us)


def build_service(config: ServerConfig, backend: Backend, engine=None) -> AttentionService:
    """The service with its scheduler, residual store and shared-memory transport. With `engine` (a front end of
    `serve --frontends N`, server/engine.py) the engine computes: no scheduler or residuals here."""
    if engine is not None:
        shm = ShmTransport() if config.allow_shm else None
        service = AttentionService(backend, config, engine, shm=shm)
        service.engine = engine
        service.keeps_residuals = bool(engine.info.get("residuals"))
        return service
    scheduler = make_scheduler(backend, config)
    residuals = ResidualStore(config.residual_bytes, config.residual_ttl_s) if config.residual_bytes > 0 else None
    shm = None
    if config.allow_shm:
        pin = backend.device.type == "cuda" and config.shm_pin_bytes > 0 and cuda_host.available()
        shm = ShmTransport(scheduler.allocate, HostPinner(config.shm_pin_bytes) if pin else None)
    service = AttentionService(backend, config, scheduler, residuals=residuals, shm=shm)
    scheduler.upstream = lambda: service.in_flight  # lets the batcher skip its delay when no one else is sending
    return service


async def build_server(config: ServerConfig, backend: Optional[Backend] = None, engine=None) -> Running:
    if engine is not None:
        backend = RemoteBackend(engine.info)
    backend = backend or create_backend(config.backend, config.device or None)
    service = build_service(config, backend, engine)
    server = grpc.aio.server(options=grpc_options(config),
                             interceptors=[TokenInterceptor(config.token)] if config.token else [])
    add_to_server(service, server)  # the generated registration, with the fast frame codec
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        with open(config.tls_cert, "rb") as f:
            cert = f.read()
        with open(config.tls_key, "rb") as f:
            key = f.read()
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not listen on {address}")
    if config.unix_socket:
        server.add_insecure_port(f"unix:{config.unix_socket}")
    await server.start()
    log.info("flashserve %s backend on %s (port %d)", backend.name, backend.device_name(), port)
    return Running(server=server, service=service, health=health_servicer, port=port)


async def drain(running: Running, grace_s: float) -> None:
    """Stop taking new calls (health says NOT_SERVING), let in-flight calls finish, then stop."""
    await running.health.enter_graceful_shutdown()
    await running.server.stop(grace_s)
    await running.service.scheduler.close()
    if running.service.shm is not None:
        running.service.shm.close()


def set_cpu_threads(config: ServerConfig, backend: Backend) -> None:
    """A CPU backend's compute threads share the cores: give each its share of torch's threads. More would
    oversubscribe them, and OpenMP's spin-waiting then stalls every barrier of a launch (seen on a 2-core
    machine: a 45 ms launch took 1-2 s whenever another busy thread was runnable)."""
    if backend.device.type == "cpu":
        torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, config.workers)))


async def serve(config: ServerConfig, ready: Optional[threading.Event] = None) -> int:
    """Run until SIGTERM / SIGINT, then drain; the process's exit status. Three roles: a whole server (the
    default), the GPU process of `--frontends N` (`serve_engine`), or one of its front ends (started by it, with
    the engine's socket in FLASHSERVE_ENGINE_SOCKET)."""
    if config.metrics_port:
        metrics.serve_metrics(config.metrics_port, "0.0.0.0" if config.host in ("0.0.0.0", "::") else config.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine_path = frontend_socket_path()
    if engine_path:
        engine = EngineClient(engine_path, on_lost=stop.set)  # the engine gone: this front end stops too
        await engine.connect()
        running = await build_server(config, engine=engine)
        backend = running.service.backend
    else:
        backend = create_backend(config.backend, config.device or None)
        set_cpu_threads(config, backend)  # the process is ours (not so for in-process servers: tests, demo)
        if config.gil_switch_us > 0:
            sys.setswitchinterval(config.gil_switch_us / 1e6)
        if config.frontends > 0:
            return await serve_engine(config, backend, stop, ready)
        running = await build_server(config, backend)
    print(f"flashserve listening on {config.host}:{running.port} (backend {backend.name}, "
          f"device {backend.device_name()})", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("draining (up to %.0f s)", config.drain_s)
    await drain(running, config.drain_s)
    return 0


async def serve_engine(config: ServerConfig, backend: Backend, stop: asyncio.Event,
                       ready: Optional[threading.Event] = None) -> int:
    """The GPU process of `serve --frontends N`: computes what its N front-end processes hand over (server/engine.py)."""
    from .processes import Supervisor

    service = build_service(config, backend)
    engine = Engine(service)
    sockdir = tempfile.mkdtemp(prefix="flashserve-engine-")  # 0700: only this user reaches the engine
    path = os.path.join(sockdir, "engine.sock")
    await engine.start(path)
    supervisor = Supervisor(config, count=config.frontends, metrics_offset=1, extra={ENGINE_ENV: path})
    loop = asyncio.get_running_loop()
    failed = False
    try:
        port = supervisor.start()
        print(f"flashserve engine: backend {backend.name} on {backend.device_name()}, {config.frontends} gRPC "
              f"front ends on {config.host}:{port}", flush=True)
        watcher = loop.run_in_executor(None, supervisor.watch)
        watcher.add_done_callback(lambda f: stop.set())
        if ready is not None:
            ready.set()
        await stop.wait()
        supervisor.stopping.set()
        failed = await watcher
    finally:
        log.info("draining (up to %.0f s)", config.drain_s)
        await loop.run_in_executor(None, supervisor.shutdown)  # front ends drain their calls first
        await engine.close()
        await service.scheduler.close()
        if service.shm is not None:
            service.shm.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    return 1 if failed else 0


class BackgroundServer:
    """A server on its own thread and event loop; `with BackgroundServer(cfg) as s: s.target`."""

    def __init__(self, config: ServerConfig, backend: Optional[Backend] = None):
        self.config = config
        self._backend = backend
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flashserve-server", daemon=True)
        self.running: Optional[Running] = None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.running.port}"

    @property
    def service(self) -> AttentionService:
        return self.running.service

    def start(self) -> "BackgroundServer":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(build_server(self.config, self._backend), self._loop)
        self.running = fut.result(timeout=60)
        return self

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop (tests use it to poke at server state)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        if self.running is not None:
            self.call(drain(self.running, grace_s))
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
