"""Worker sessions: every call a worker makes after Join carries its session, checked by one interceptor.

Join (with a valid join token) returns a session secret bound to the new worker id; the ledger
keeps its hash. Each later call of the worker sends two metadata entries, SESSION_WORKER (its
id) and SESSION_SECRET, and this interceptor refuses the call (UNAUTHENTICATED) unless the
secret is that live worker's; a worker declared dead or gone has no session any more, and a
coordinator restart keeps every session (they are in the ledger). Then the call may act only
as itself: a request whose worker_id is another's is refused (PERMISSION_DENIED). A stream's
session is checked when it opens; the heartbeat stream (Heartbeats) refuses each message whose
worker has died or left since (its session ended with it), and each in another's name. A worker
id alone, which Status and the dashboard print, grants nothing.

Read-only calls (Status, Events) are open, or need the run's read token when
coordinator.read_access = "token" (READ_TOKEN metadata; the admin token also reads).
GetCheckpoint, which hands out the run's weights, needs a session or the admin token
(ADMIN_TOKEN metadata).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

SESSION_WORKER, SESSION_SECRET = "gptjt-worker", "gptjt-session"
READ_TOKEN, ADMIN_TOKEN = "gptjt-read-token", "gptjt-admin-token"

_SERVICE = "/gptjt.Coordinator/"
# Calls a worker makes in its own name, each with a worker_id field (PutCheckpoint: in its header).
SESSION_METHODS = frozenset(_SERVICE + m for m in (
    "Heartbeat", "Heartbeats", "Leave", "Watch", "LeaseTickets", "CommitTicket", "ReleaseTickets", "ReportStep",
    "ReportPeerFailure", "PutCheckpoint", "GetCheckpoint", "ReportCheck"))
READ_METHODS = frozenset({_SERVICE + "Status", "/gptjt.Operator/Events"})
ADMIN_MAY = frozenset({_SERVICE + "GetCheckpoint"})  # the admin token stands in for a session


def caller(context) -> str:
    """The worker id the session interceptor authenticated for this call ("" if none)."""
    return dict(context.invocation_metadata()).get(SESSION_WORKER, "")


def _abort(code: grpc.StatusCode, message: str):
    async def deny(request, context):
        await context.abort(code, message)

    return deny


class SessionGuard(grpc.aio.ServerInterceptor):
    """Refuses worker calls without a valid session, and calls made in another worker's name."""

    def __init__(self, session_valid: Callable[[str, str], bool], admin_valid: Callable[[str], bool],
                 read_token_valid: Callable[[str], bool] | None = None):
        """session_valid(worker_id, secret); admin_valid(token); read_token_valid(token), or None
        when reading is open (the admin token reads too)."""
        self.session_valid, self.admin_valid, self.read_token_valid = session_valid, admin_valid, read_token_valid

    async def intercept_service(self, continuation, details):
        method = details.method
        metadata = dict(details.invocation_metadata or ())
        if method in READ_METHODS and self.read_token_valid is not None:
            read, admin = metadata.get(READ_TOKEN, ""), metadata.get(ADMIN_TOKEN, "")
            if not (self.read_token_valid(read) or self.admin_valid(admin)):
                return _denied(await continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                               _read_refusal(read or admin))
            return await continuation(details)
        if method not in SESSION_METHODS:
            return await continuation(details)
        if method in ADMIN_MAY and self.admin_valid(metadata.get(ADMIN_TOKEN, "")):
            return await continuation(details)
        worker_id = metadata.get(SESSION_WORKER, "")
        if not self.session_valid(worker_id, metadata.get(SESSION_SECRET, "")):
            return _denied(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, no_session(worker_id))
        handler = await continuation(details)
        return _as_worker(handler, worker_id) if handler is not None else None


def no_session(worker_id: str) -> str:
    """Why a call, or a message of a stream, was refused for want of a live session."""
    return (f"no valid session for worker {worker_id!r}: join the run first (a worker declared dead joins again as "
            "a new worker)")


def _read_refusal(presented: str) -> str:
    how = ("pass --read-token or set GPTJT_READ_TOKEN (the admin token reads too); the operator has it in "
           "STATE.read-token beside the ledger, or in $GPTJT_READ_TOKEN of the coordinator")
    if presented:
        return f"the token given is neither this run's read token nor its admin token: {how}"
    return f"this coordinator needs its read token to show the run's status: {how}"


def _denied(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str):
    """A handler of the same shape that refuses the call."""
    if handler is None:
        return None
    deny = _abort(code, message)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_streaming(deny), handler.request_deserializer,
                                                     handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(deny), handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


def _streaming(deny):
    async def stream(request, context):
        await deny(request, context)
        yield  # pragma: no cover (abort raises)

    return stream


def _as_worker(handler: grpc.RpcMethodHandler, worker_id: str) -> grpc.RpcMethodHandler:
    """The handler, refusing a unary request whose worker_id is not the session's (streamed
    requests are checked by their handler: PutCheckpoint's header, each Heartbeats message)."""
    if handler.request_streaming:
        return handler

    def own(request, context) -> bool:
        claimed = getattr(request, "worker_id", worker_id)
        return hmac.compare_digest(claimed.encode(), worker_id.encode())

    if handler.response_streaming:
        inner = handler.unary_stream

        async def checked_stream(request, context):
            if not own(request, context):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, not_yours(request, worker_id))
            async for item in inner(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(checked_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    inner_unary = handler.unary_unary

    async def checked(request, context):
        if not own(request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, not_yours(request, worker_id))
        return await inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(checked, handler.request_deserializer, handler.response_serializer)


def not_yours(request, worker_id: str) -> str:
    """Why a request in another worker's name was refused."""
    return (f"worker_id {request.worker_id!r} is not the session's worker {worker_id!r}: a worker acts only in its "
            "own name")
