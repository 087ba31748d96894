"""The relay for workers behind NAT, in process on loopback: coordinator/relay.py (server),
worker/relay_tunnel.py (the worker's side). The NAT drill with real namespaces is
tests/integration/test_nat.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from coordinator.relay import Relay
from gptjt_core.relay_protocol import RelayProtocolError
from worker.relay_tunnel import RelayTunnel, reachable_from_relay

TOKEN = "join-token"


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_tunnel_carries_connections_both_ways_and_checks_say_what_is_reachable():
    async def main() -> None:
        relay = Relay("127.0.0.1", 0, lambda t: t == TOKEN)
        relay_address = f"127.0.0.1:{await relay.start()}"
        server, port = await _echo_server()
        assert await reachable_from_relay(relay_address, TOKEN, f"127.0.0.1:{port}")
        assert not await reachable_from_relay(relay_address, TOKEN, f"127.0.0.1:{_closed_port()}")
        tunnel = RelayTunnel(relay_address, TOKEN)
        public = await tunnel.open()
        assert public.startswith("127.0.0.1:") and public != relay_address
        bridging = asyncio.create_task(tunnel.run(f"127.0.0.1:{port}"))
        payload = bytes(range(256)) * 4096  # 1 MiB, several pipe chunks
        for _ in range(3):  # three connections, one after the other, each its own splice
            r, w = await asyncio.open_connection("127.0.0.1", tunnel.public_port)
            w.write(payload)
            await w.drain()
            assert await r.readexactly(len(payload)) == payload
            w.close()
        tunnel.close()
        with pytest.raises(RuntimeError, match="closed this worker's tunnel"):
            await asyncio.wait_for(bridging, 5)
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):  # the public port went with the tunnel
            await asyncio.open_connection("127.0.0.1", tunnel.public_port)
        server.close()
        await relay.close()

    asyncio.run(main())


@pytest.mark.parametrize("line, why", [
    (b'{"op": "serve", "token": "wrong"}\n', "join token"),
    (b'{"op": "fly"}\n', "not one of"),
    (b'{"op": "check", "token": "join-token", "address": "nowhere"}\n', "not host:port"),
    (b'{"op": "data", "id": "never-issued"}\n', "no connection"),
    (b"[1, 2]\n", "not a JSON object"),
    (b"x" * 5000 + b"\n", "5001 bytes, over 1024"),
])
def test_what_is_not_the_protocol_is_refused_with_why(line, why):
    async def main() -> None:
        relay = Relay("127.0.0.1", 0, lambda t: t == TOKEN)
        port = await relay.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(line)
        await w.drain()
        reply = await asyncio.wait_for(r.read(), 5)
        assert b'"error"' in reply and why.encode() in reply, reply
        await relay.close()

    asyncio.run(main())


def test_a_worker_told_no_by_the_relay_says_why():
    async def main() -> None:
        relay = Relay("127.0.0.1", 0, lambda t: False)
        address = f"127.0.0.1:{await relay.start()}"
        with pytest.raises(RelayProtocolError, match="refused: the join token"):
            await RelayTunnel(address, TOKEN).open()
        await relay.close()

    asyncio.run(main())
