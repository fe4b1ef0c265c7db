"""Errors the client raises."""
from __future__ import annotations

import grpc


class RemoteError(RuntimeError):
    """The server refused or failed a call; `code` is the gRPC status, `details` its message."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str = ""):
        self.code = code
        self.details = details
        self.target = target
        where = f" ({target})" if target else ""
        super().__init__(f"flashserve server{where}: {code.name}: {details}")


class ResidualsEvicted(RemoteError):
    """The server no longer holds the residuals a Backward named (FAILED_PRECONDITION)."""
