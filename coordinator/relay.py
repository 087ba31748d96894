"""A relay for workers that cannot accept connections (behind NAT): gptjt_core/relay_protocol.py.

Runs in the coordinator's process on coordinator.relay_listen. Everything it reads is from the
network and checked: one bounded JSON line per connection, the join token for check and serve,
a tunnel connection id it issued itself for data. Bounds: MAX_TUNNELS tunnels, MAX_WAITING
accepted connections per tunnel waiting for the worker's data connection (each for at most
WAIT_S), CHECK_TIMEOUT_S per reachability check.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

from gptjt_core.relay_protocol import (MAX_LINE_BYTES, RelayProtocolError, decode_line, encode_line,
                                       request_problem)

log = logging.getLogger("gptjt.relay")

MAX_TUNNELS = 1024
MAX_WAITING = 64
WAIT_S = 10.0
CHECK_TIMEOUT_S = 3.0
FIRST_LINE_S = 10.0
PIPE_BYTES = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(PIPE_BYTES):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Bytes both ways until either side closes."""
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


class Relay:
    """The relay server: check, serve (tunnels with a public port each) and data connections."""

    def __init__(self, host: str, port: int, token_ok: Callable[[str], bool]):
        self.host, self.port, self.token_ok = host, port, token_ok
        self.server: asyncio.Server | None = None
        self.tunnels: dict[int, asyncio.StreamWriter] = {}  # public port -> the worker's control connection
        self.waiting: dict[str, tuple[int, asyncio.StreamReader, asyncio.StreamWriter]] = {}  # id -> (port, conn)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.tunnels.values()):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                async with asyncio.timeout(FIRST_LINE_S):  # not wait_for: on 3.11 it can lose a cancel
                    line = await reader.readline()
            except ValueError:  # over the stream's 64 KiB limit
                raise RelayProtocolError(f"a request line over {MAX_LINE_BYTES} bytes") from None
            if len(line) > MAX_LINE_BYTES:
                raise RelayProtocolError(f"a request line of {len(line)} bytes, over {MAX_LINE_BYTES}")
            message = decode_line(line)
            problem = request_problem(message)
            if problem:
                raise RelayProtocolError(problem)
            if message["op"] != "data" and not self.token_ok(message["token"]):
                raise RelayProtocolError("the join token is not this run's (or was revoked)")
            if message["op"] == "check":
                writer.write(encode_line({"reachable": await self._reachable(message["address"])}))
                await writer.drain()
            elif message["op"] == "serve":
                await self._serve(reader, writer, peer)
                return
            else:
                await self._data(message["id"], reader, writer)
                return
        except (RelayProtocolError, TimeoutError) as e:
            log.warning("relay: refused %s: %s", peer, e or "no request line in time")
            try:
                writer.write(encode_line({"error": str(e) or "no request line in time"}))
                await writer.drain()
            except (ConnectionError, OSError):
                pass
        except (ConnectionError, OSError):
            pass
        writer.close()

    @staticmethod
    async def _reachable(address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                _, w = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError):
            return False
        w.close()
        return True

    async def _serve(self, reader: asyncio.StreamReader, control: asyncio.StreamWriter, peer) -> None:
        if len(self.tunnels) >= MAX_TUNNELS:
            raise RelayProtocolError(f"the relay holds {MAX_TUNNELS} tunnels already")

        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if sum(1 for p, _, _ in self.waiting.values() if p == port) >= MAX_WAITING:
                w.close()
                return
            conn_id = secrets.token_hex(16)
            self.waiting[conn_id] = (port, r, w)
            control.write(encode_line({"open": conn_id}))
            await asyncio.sleep(WAIT_S)
            if self.waiting.pop(conn_id, None) is not None:  # the worker never came for it
                w.close()

        public = await asyncio.start_server(accepted, self.host, 0)
        port = public.sockets[0].getsockname()[1]
        self.tunnels[port] = control
        log.info("relay: tunnel for %s on port %d", peer, port)
        try:
            control.write(encode_line({"port": port}))
            await control.drain()
            while await reader.read(PIPE_BYTES):  # the worker sends nothing; EOF ends the tunnel
                pass
        finally:
            public.close()
            self.tunnels.pop(port, None)
            for conn_id in [i for i, (p, _, _) in self.waiting.items() if p == port]:
                self.waiting.pop(conn_id)[2].close()
            control.close()
            log.info("relay: tunnel on port %d closed", port)

    async def _data(self, conn_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        entry = self.waiting.pop(conn_id, None)
        if entry is None:
            raise RelayProtocolError(f"no connection {conn_id[:16]!r} waits for its tunnel (unknown or expired)")
        _, r, w = entry
        await splice((reader, writer), (r, w))
