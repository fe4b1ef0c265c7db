"""Bearer-token authentication as a gRPC server interceptor.

Clients send `authorization: Bearer <token>` metadata. Health checks and reflection stay open so
load balancers and probes need no secret."""
from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _deny(message: str):
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return abort


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return await continuation(handler_call_details)
        message = "missing bearer token (metadata 'authorization')" if not sent else "invalid bearer token"
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny(message))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny(message))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny(message))
        return grpc.unary_unary_rpc_method_handler(_deny(message))
