"""Server settings: one dataclass, filled from defaults, FLASHSERVE_* environment variables and flags
(flags win). Each field's help text is shown by `flashserve serve --help` and in the README table."""
from __future__ import annotations

import argparse
import dataclasses
import os


@dataclasses.dataclass
class ServerConfig:
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to listen on ('0.0.0.0' for all)"})
    port: int = dataclasses.field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    unix_socket: str = dataclasses.field(default="", metadata={"help": "also listen on this unix socket path"})
    backend: str = dataclasses.field(default="auto", metadata={"help": "auto | flash | torch"})
    device: str = dataclasses.field(default="", metadata={"help": "torch device for the backend (default: cuda if present)"})
    max_tokens: int = dataclasses.field(default=1 << 20, metadata={"help": "max q+k tokens in one request"})
    max_request_bytes: int = dataclasses.field(default=2 << 30, metadata={"help": "max bytes of all tensors in one request"})
    max_concurrent: int = dataclasses.field(default=64, metadata={"help": "requests in flight before RESOURCE_EXHAUSTED"})
    max_inflight_bytes: int = dataclasses.field(default=8 << 30, metadata={"help": "tensor bytes of all requests in flight together (host memory bound)"})
    max_message_bytes: int = dataclasses.field(default=80 << 20, metadata={"help": "gRPC message size limit"})
    chunk_bytes: int = dataclasses.field(default=4 << 20, metadata={"help": "largest response chunk (payloads under 16 of them use smaller chunks, at least 1 MB)"})
    processes: int = dataclasses.field(default=1, metadata={"help": "server processes sharing the TCP port, each with its own event loop, compute threads and batching (one Python process is GIL-bound at a few hundred small requests/s)"})
    frontends: int = dataclasses.field(default=0, metadata={"help": "gRPC front-end processes (sharing the TCP port) that validate requests and hand them to this process, which only batches and computes (0: this process serves gRPC itself); for many small requests"})
    workers: int = dataclasses.field(default=2, metadata={"help": "compute threads"})
    cpu_threads: int = dataclasses.field(default=0, metadata={"help": "torch threads per compute thread on a CPU backend (0: cores / workers)"})
    gil_switch_us: int = dataclasses.field(default=0, metadata={"help": "Python's GIL switch interval in microseconds (0: Python's 5000); shorter lets compute threads get the GIL back sooner from a busy event loop"})
    heap_keep_mb: int = dataclasses.field(default=256, metadata={"help": "freed memory each heap of the process keeps for reuse, in MB (glibc): large messages then reuse pages instead of faulting fresh ones in on every transfer (0: the allocator's defaults)"})
    batch_tokens: int = dataclasses.field(default=32768, metadata={"help": "token budget of one batched launch (0: no batching)"})
    batch_delay_us: int = dataclasses.field(default=500, metadata={"help": "max time a request waits to be batched"})
    allow_shm: bool = dataclasses.field(default=False, metadata={"help": "accept same-host shared-memory tensors"})
    shm_pin_bytes: int = dataclasses.field(default=8 << 30, metadata={"help": "client shared memory a CUDA server may page-lock for direct GPU copies (0: copy through staging)"})
    residual_bytes: int = dataclasses.field(default=4 << 30, metadata={"help": "memory budget for residuals kept for backward"})
    residual_ttl_s: float = dataclasses.field(default=300.0, metadata={"help": "seconds residuals are kept"})
    token: str = dataclasses.field(default="", metadata={"help": "bearer token clients must send (empty: none)"})
    tls_cert: str = dataclasses.field(default="", metadata={"help": "PEM certificate chain for TLS"})
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM private key for TLS"})
    metrics_port: int = dataclasses.field(default=0, metadata={"help": "Prometheus metrics HTTP port (0: off)"})
    drain_s: float = dataclasses.field(default=30.0, metadata={"help": "grace period for in-flight work on SIGTERM"})
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "logging level"})

    @staticmethod
    def env_name(field: str) -> str:
        return "FLASHSERVE_" + field.upper()

    @classmethod
    def from_env(cls, environ=None) -> "ServerConfig":
        environ = os.environ if environ is None else environ
        cfg = cls()
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None and raw != "":
                setattr(cfg, f.name, _parse(f.type, raw, cls.env_name(f.name)))
        return cfg

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata.get('help', '')} [env {cls.env_name(f.name)}, default {f.default!r}]"
            if f.type in ("bool", bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                parser.add_argument(flag, type=_TYPES[str(f.type)], default=None, help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ=None) -> "ServerConfig":
        cfg = cls.from_env(environ)
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                setattr(cfg, f.name, value)
        return cfg


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _parse(type_name, raw: str, name: str):
    type_name = str(type_name)
    try:
        if type_name == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return _TYPES[type_name](raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a valid {type_name}") from None


def config_table() -> str:
    """Markdown table of every setting (for the README)."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(ServerConfig):
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{ServerConfig.env_name(f.name)}` | `{f.default!r}` | "
                    f"{f.metadata.get('help', '')} |")
    return "\n".join(rows)

