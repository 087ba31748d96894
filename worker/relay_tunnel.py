"""A worker's way to serve a stage from behind NAT: through a relay (coordinator/relay.py).

At start, with --relay HOST:PORT, the worker asks the relay whether it can reach the worker's
stage address; if not, it opens a tunnel: the relay gives it a public port, announced as
HOST:PORT' in place of the unreachable address, and for each connection to that port the
worker dials the relay again and splices it to its own stage server. Stage links keep their
mutual TLS end to end. If the tunnel's control connection drops, the worker's address is dead:
`run` returns and the worker stops (and re-joins, opening a new tunnel).
"""

from __future__ import annotations

import asyncio
import logging

from gptjt_core.relay_protocol import MAX_LINE_BYTES, RelayProtocolError, decode_line, encode_line

log = logging.getLogger("gptjt.worker")

PIPE_BYTES = 1 << 16
CONNECT_TIMEOUT_S = 10.0


async def _request(relay: str, message: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict]:
    host, _, port = relay.rpartition(":")
    async with asyncio.timeout(CONNECT_TIMEOUT_S):  # not wait_for: on 3.11 it can lose a cancel (event_wait.py)
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    writer.write(encode_line(message))
    await writer.drain()
    if message["op"] == "data":
        return reader, writer, {}
    async with asyncio.timeout(CONNECT_TIMEOUT_S + 5):
        line = await reader.readline()
    if len(line) > MAX_LINE_BYTES:
        raise RelayProtocolError(f"the relay at {relay} answered a line of {len(line)} bytes")
    reply = decode_line(line)
    if "error" in reply:
        writer.close()
        raise RelayProtocolError(f"the relay at {relay} refused: {reply['error']}")
    return reader, writer, reply


async def reachable_from_relay(relay: str, token: str, address: str) -> bool:
    """Can the relay open a TCP connection to `address` (where this worker listens)?"""
    _, writer, reply = await _request(relay, {"op": "check", "token": token, "address": address})
    writer.close()
    return reply.get("reachable") is True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(PIPE_BYTES):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class RelayTunnel:
    """This worker's tunnel through a relay: a public port there, spliced to the local server."""

    def __init__(self, relay: str, token: str):
        self.relay, self.token = relay, token
        self.public_port = 0
        self._control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._bridges: set[asyncio.Task] = set()

    @property
    def public_address(self) -> str:
        return f"{self.relay.rpartition(':')[0]}:{self.public_port}"

    async def open(self) -> str:
        """Open the tunnel; returns the public address to announce."""
        reader, writer, reply = await _request(self.relay, {"op": "serve", "token": self.token})
        port = reply.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            writer.close()
            raise RelayProtocolError(f"the relay at {self.relay} gave no port: {reply}")
        self.public_port, self._control = port, (reader, writer)
        return self.public_address

    async def run(self, local: str) -> None:
        """Splice each connection the relay announces to the stage server at `local` (host:port),
        until the relay closes the tunnel: then RuntimeError (the worker's address is gone, so the
        worker stops and re-joins)."""
        reader, _ = self._control
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError(f"the relay at {self.relay} closed this worker's tunnel ({self.public_address}); "
                                   "its address is gone")
            try:
                conn_id = decode_line(line[:MAX_LINE_BYTES + 1]).get("open")
            except RelayProtocolError as e:
                log.warning("relay at %s: %s", self.relay, e)
                continue
            if isinstance(conn_id, str):
                task = asyncio.create_task(self._bridge(conn_id, local))
                self._bridges.add(task)
                task.add_done_callback(self._bridges.discard)

    async def _bridge(self, conn_id: str, local: str) -> None:
        try:
            remote_r, remote_w, _ = await _request(self.relay, {"op": "data", "id": conn_id})
            host, _, port = local.rpartition(":")
            local_r, local_w = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, RelayProtocolError) as e:
            log.warning("relay connection %s could not be bridged: %s", conn_id[:8], e)
            return
        await asyncio.gather(_pipe(remote_r, local_w), _pipe(local_r, remote_w))

    def close(self) -> None:
        if self._control is not None:
            self._control[1].close()
        for task in list(self._bridges):
            task.cancel()


async def address_to_announce(relay: str, token: str, address: str, reservation) -> tuple[str, RelayTunnel | None]:
    """(the address to announce, the tunnel if one was needed): `address` when the relay reaches
    it (the reservation listens while it checks), else a tunnel's public address. Says which."""
    reservation.listen()
    if await reachable_from_relay(relay, token, address):
        print(f"gptjt-worker: reachable directly at {address} (checked from the relay at {relay})", flush=True)
        return address, None
    tunnel = RelayTunnel(relay, token)
    public = await tunnel.open()
    print(f"gptjt-worker: {address} is not reachable from the relay at {relay} (NAT or a firewall); serving "
          f"through the relay as {public}", flush=True)
    return public, tunnel
