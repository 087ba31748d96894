"""Calls to a running coordinator for the operator commands, with errors that carry an exit code.

Exit codes scripts can rely on (docs/cli.md):
  0  done
  2  bad argument: a malformed option, an unknown worker or token id (argparse uses 2 as well)
  3  the coordinator could not be reached
  4  refused: no or wrong admin token (or read token, where reading needs one), or the action
     cannot be done now (the worker already left)
"""

from __future__ import annotations

import json
import os

import grpc

from coordinator.sessions import ADMIN_TOKEN, READ_TOKEN
from gptjt_core.status_gzip import BadStatusGzip, gunzip_status
from gptjt_proto import coordinator_pb2 as pb
from gptjt_proto import coordinator_pb2_grpc as pb_grpc
from gptjt_proto import operator_pb2_grpc as opb_grpc

EXIT_OK, EXIT_BAD_ARGUMENT, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 2, 3, 4
ADMIN_TOKEN_ENV = "GPTJT_ADMIN_TOKEN"
READ_TOKEN_ENV = "GPTJT_READ_TOKEN"
COORDINATOR_ENV = "GPTJT_COORDINATOR"


class CommandError(RuntimeError):
    """An error meant for the user: one line, and the process exits with `exit_code`."""

    exit_code = EXIT_BAD_ARGUMENT


class BadArgument(CommandError):
    """The command's arguments are wrong (exit code 2)."""
    exit_code = EXIT_BAD_ARGUMENT


class Unreachable(CommandError):
    """The coordinator did not answer (exit code 3)."""
    exit_code = EXIT_UNREACHABLE


class Refused(CommandError):
    """The coordinator refused the request (exit code 4)."""
    exit_code = EXIT_REFUSED


_BY_CODE = {grpc.StatusCode.UNAVAILABLE: Unreachable, grpc.StatusCode.DEADLINE_EXCEEDED: Unreachable,
            grpc.StatusCode.UNAUTHENTICATED: Refused, grpc.StatusCode.PERMISSION_DENIED: Refused,
            grpc.StatusCode.FAILED_PRECONDITION: Refused, grpc.StatusCode.NOT_FOUND: BadArgument,
            grpc.StatusCode.INVALID_ARGUMENT: BadArgument}


# The status object lists every worker: ~1 KB each, so past ~4,000 workers it outgrows gRPC's
# default 4 MB limit on a received message (bench heartbeat at 10,000 workers saw every poll
# fail with RESOURCE_EXHAUSTED). 256 MB holds a run of a few hundred thousand workers.
STATUS_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]


def open_channel(address: str, tls_ca: str = "") -> grpc.Channel:
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options=STATUS_OPTIONS)
    return grpc.insecure_channel(address, options=STATUS_OPTIONS)


def raise_for(e: grpc.RpcError, address: str, what: str) -> None:
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise Unreachable(f"coordinator {address} did not answer ({code.name}): is it running? Check "
                          "--coordinator HOST:PORT (or $GPTJT_COORDINATOR)") from None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        raise Refused(f"coordinator {address} does not offer {what} (an older version?); upgrade it") from None
    raise _BY_CODE.get(code, CommandError)(e.details() or f"{what} failed ({code.name})") from None


def _leader(address: str, call):
    """call(one address) for each of a comma-separated list (a coordinator and its standbys,
    coordinator.ledger_url) until one answers: a standby answers UNAVAILABLE, as does one that is down."""
    addresses = [a.strip() for a in address.split(",") if a.strip()] or [address]
    for one in addresses[:-1]:
        try:
            return call(one)
        except Unreachable:
            continue
    return call(addresses[-1])


def call_status(address: str, tls_ca: str = "", timeout: float = 10.0, metadata: tuple = ()) -> dict:
    """The coordinator's status object (the same one the dashboard shows); metadata: read_metadata().
    address: HOST:PORT, or several comma-separated (the first that leads answers)."""
    return _leader(address, lambda one: _call_status(one, tls_ca, timeout, metadata))


def _call_status(address: str, tls_ca: str, timeout: float, metadata: tuple) -> dict:
    with open_channel(address, tls_ca) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(accept_gzip=True), timeout=timeout,
                                                             metadata=metadata)
        except grpc.RpcError as e:
            raise_for(e, address, "Status")
    return json.loads(status_json(reply, address))


def status_json(reply, address: str) -> str:
    """A StatusReply's JSON text, gzipped or not (a coordinator older than accept_gzip sends it plain)."""
    if not reply.json_gzip:
        return reply.json
    try:
        return gunzip_status(reply.json_gzip).decode()
    except (BadStatusGzip, UnicodeDecodeError) as e:
        raise Unreachable(f"coordinator {address} sent a status that cannot be read: {e}") from None


def call_operator(address: str, method: str, request, tls_ca: str = "", timeout: float = 15.0,
                  metadata: tuple = ()) -> dict:
    """One Operator RPC (Drain, SetPaused, CreateToken, RevokeToken, Events): its JSON reply.
    metadata: read_metadata() for Events (the admin actions carry their token in the request).
    address: HOST:PORT, or several comma-separated (the first that leads answers)."""
    return _leader(address, lambda one: _call_operator(one, method, request, tls_ca, timeout, metadata))


def _call_operator(address: str, method: str, request, tls_ca: str, timeout: float, metadata: tuple) -> dict:
    with open_channel(address, tls_ca) as channel:
        try:
            reply = getattr(opb_grpc.OperatorStub(channel), method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise_for(e, address, method)
    return json.loads(reply.json)


def admin_token(flag: str | None) -> str:
    return flag if flag else os.environ.get(ADMIN_TOKEN_ENV, "")


def read_token(flag: str | None) -> str:
    return flag if flag else os.environ.get(READ_TOKEN_ENV, "")


def read_metadata(read: str, admin: str) -> tuple[tuple[str, str], ...]:
    """What a read call (Status, Events) carries where coordinator.read_access = "token": the read
    token if the user gave one, else the admin token if given (it reads too), else nothing. Only one:
    the admin token is not sent where a read token does."""
    if read:
        return ((READ_TOKEN, read),)
    return ((ADMIN_TOKEN, admin),) if admin else ()
