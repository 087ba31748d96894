"""The relay's wire protocol: one JSON line per request and reply, then raw bytes. Pure.

A worker behind NAT (no inbound connections) keeps one control connection open to a relay
that others can reach (the coordinator serves one: coordinator.relay_listen); the relay
gives it a public port and splices every connection made to that port to a fresh outbound
connection from the worker. The stage link's mutual TLS runs end to end through it: the
relay sees ciphertext only and cannot pose as the worker (its certificate's CN is checked).

Requests, the first line a client sends (each carries the run's join token):
  {"op": "check", "token": T, "address": "host:port"}  can the relay open a TCP connection to
      address? Reply {"reachable": true|false}; the connection then closes.
  {"op": "serve", "token": T}   open a tunnel: reply {"port": P}; the relay then sends
      {"open": ID} on this connection for every connection accepted on port P.
  {"op": "data", "id": ID}      this connection carries tunnel connection ID: from here on,
      bytes both ways (no reply line).
Errors: {"error": "why"}, then the relay closes the connection.
"""

from __future__ import annotations

import json

MAX_LINE_BYTES = 1024  # every request and reply line is far shorter; a longer one is refused
OPS = ("check", "serve", "data")


class RelayProtocolError(ValueError):
    """A line that is not what the protocol allows (says which and why)."""


def encode_line(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_LINE_BYTES:
        raise RelayProtocolError(f"relay message of {len(data)} bytes is over {MAX_LINE_BYTES}")
    return data


def decode_line(line: bytes) -> dict:
    """One received line as a dict, or RelayProtocolError naming what is wrong with it."""
    if not line.endswith(b"\n"):
        raise RelayProtocolError(f"relay line of {len(line)} bytes has no end (over {MAX_LINE_BYTES} bytes, "
                                 "or the connection closed)")
    try:
        message = json.loads(line)
    except ValueError:
        raise RelayProtocolError(f"relay line {line[:80]!r} is not JSON") from None
    if not isinstance(message, dict):
        raise RelayProtocolError(f"relay line {line[:80]!r} is not a JSON object")
    return message


def request_problem(message: dict) -> str:
    """Why a first line is not a valid request ('' if it is)."""
    op = message.get("op")
    if op not in OPS:
        return f"op {op!r} is not one of {OPS}"
    if op in ("check", "serve") and not isinstance(message.get("token"), str):
        return f"op {op!r} needs the run's join token"
    if op == "check":
        address = message.get("address")
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"address {address!r} is not host:port"
    if op == "data" and not (isinstance(message.get("id"), str) and 0 < len(message["id"]) <= 64):
        return f"id {message.get('id')!r} is not a tunnel connection id"
    return ""
