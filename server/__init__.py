"""flashserve.server: the gRPC service, validation, scheduler, backends, metrics, auth and CLI."""
from .app import BackgroundServer, build_server, serve
from .config import ServerConfig

__all__ = ["BackgroundServer", "ServerConfig", "build_server", "serve"]
