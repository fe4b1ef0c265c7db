"""Prometheus metrics of the server (served over HTTP with --metrics-port)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

REQUESTS = Counter("flashserve_requests_total", "Requests finished, by method and gRPC status code",
                   ["method", "code"], registry=REGISTRY)
LATENCY = Histogram("flashserve_request_seconds", "Time from first frame to last response frame",
                    ["method"], registry=REGISTRY,
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
STAGE = Histogram("flashserve_stage_seconds", "Server-side time by stage (queue, copy_in, compute, copy_out)",
                  ["stage"], registry=REGISTRY,
                  buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
BYTES_IN = Counter("flashserve_received_bytes_total", "Tensor bytes received", registry=REGISTRY)
BYTES_OUT = Counter("flashserve_sent_bytes_total", "Tensor bytes sent", registry=REGISTRY)
TOKENS = Counter("flashserve_tokens_total", "Query tokens computed", ["method"], registry=REGISTRY)
IN_FLIGHT = Gauge("flashserve_requests_in_flight", "Requests being served now", registry=REGISTRY)
BATCH_REQUESTS = Histogram("flashserve_batch_requests", "Requests sharing one kernel launch", registry=REGISTRY,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))


def serve_metrics(port: int, addr: str = "127.0.0.1"):
    """Start the /metrics HTTP endpoint; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=REGISTRY)
LAUNCHES = Counter("flashserve_kernel_launches_total", "Backend compute calls (one per batch)", registry=REGISTRY)
RESIDUAL_BYTES = Gauge("flashserve_residual_bytes", "Bytes of residuals kept for backward", registry=REGISTRY)
RESIDUAL_EVICTIONS = Counter("flashserve_residual_evictions_total", "Residual sets evicted (budget or TTL)",
                             ["reason"], registry=REGISTRY)
# Where the compute workers' time goes: "busy" is wall time inside a launch's worker call (its job preparation,
# copies, compute and outputs), "cpu" that thread's CPU time, "gpu_wait" the part spent waiting for CUDA streams.
# busy - cpu - gpu_wait is time the worker was runnable but not running (the GIL, or a busy host).
WORKER_SECONDS = Counter("flashserve_worker_seconds_total", "Compute-worker seconds by kind (busy, cpu, gpu_wait)",
                         ["kind"], registry=REGISTRY)
SHM_BYTES = Counter("flashserve_shm_bytes_total", "Tensor bytes moved through shared memory", ["direction"],
                    registry=REGISTRY)
