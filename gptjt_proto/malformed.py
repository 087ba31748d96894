"""Requests whose bytes do not parse end with INVALID_ARGUMENT naming the message, not UNKNOWN.

The one hand-written module of this package (the rest is protoc's): a server interceptor both
the coordinator and the workers install. grpc parses a request before any handler runs, and a
parse error surfaces as UNKNOWN with a Python traceback's text; here the parse error becomes a
value the wrapped handler refuses with a status that says what to fix.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as e:
            return _Malformed(e)

    return parse


async def _refuse(context, method: str, bad: _Malformed):
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message of this call ({bad.error}); "
                        "use the gptjt client or the .proto files in proto/")


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Refuses requests that do not parse with INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parse = details.method, _tolerant(handler.request_deserializer)
        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary

            async def checked_requests(requests, context):
                async for request in requests:
                    if isinstance(request, _Malformed):
                        await _refuse(context, method, request)
                    yield request

            if handler.response_streaming:
                async def stream_stream(requests, context):
                    async for reply in inner(checked_requests(requests, context), context):
                        yield reply

                return grpc.stream_stream_rpc_method_handler(stream_stream, parse, handler.response_serializer)

            async def stream_unary(requests, context):
                return await inner(checked_requests(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, parse, handler.response_serializer)
        inner = handler.unary_stream or handler.unary_unary
        if handler.response_streaming:
            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await _refuse(context, method, request)
                async for reply in inner(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, parse, handler.response_serializer)

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await _refuse(context, method, request)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)
