"""The dashboard's live status stream (/api/stream): a page that goes away mid-stream, and a
status of megabytes written in pieces with the loop served between them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from coordinator.dashboard import http as dashboard_http
from coordinator.dashboard import status_events


class _PageGoneAfterTwoWrites:
    """aiohttp's StreamResponse as a closed tab leaves it: a write that must wait for the socket to
    drain (a 10,000-worker status is megabytes) fails with ConnectionError("Connection lost"),
    which is not a ConnectionResetError."""

    def __init__(self, headers: dict):
        self.writes = 0

    async def prepare(self, request) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes > 2:
            raise ConnectionError("Connection lost")


class _Statuses:
    async def get(self) -> bytes:
        return b"{}"


def test_a_page_gone_mid_stream_ends_the_stream_quietly(monkeypatch):
    """It ended with an exception aiohttp logged as 'Error handling request', with a traceback, for
    every dashboard closed while the coordinator wrote a large status to it."""
    monkeypatch.setattr(dashboard_http.web, "StreamResponse", _PageGoneAfterTwoWrites)
    dashboard = dashboard_http.Dashboard(None, None, stream_interval_s=0.01, statuses=_Statuses())
    response = asyncio.run(dashboard.stream(SimpleNamespace(method="GET")))
    assert response.writes == 3  # "retry", the status event's head, and its first piece, which found the page gone


class _Recorder:
    """A StreamResponse that keeps what is written, and notes each time another task ran between writes."""

    def __init__(self):
        self.pieces: list[bytes] = []
        self.others_ran_between: list[bool] = []
        self.ticks = 0

    async def write(self, data) -> None:
        self.others_ran_between.append(bool(self.ticks))
        self.ticks = 0
        self.pieces.append(bytes(data))


def test_a_large_status_goes_out_in_pieces_with_the_loop_served_between_them():
    payload = b'{"workers": [' + b"0," * 200_000 + b'0]}'  # ~400 kB, one line
    response = _Recorder()

    async def other_work(done: asyncio.Event) -> None:  # a heartbeat handler, say
        while not done.is_set():
            response.ticks += 1
            await asyncio.sleep(0)

    async def main() -> None:
        done = asyncio.Event()
        other = asyncio.create_task(other_work(done))
        await asyncio.sleep(0)
        await status_events.write_status_event(response, payload, piece_bytes=64 * 1024)
        done.set()
        await other

    asyncio.run(main())
    assert b"".join(response.pieces) == b"event: status\ndata: " + payload + b"\n\n"  # one SSE event
    assert max(len(p) for p in response.pieces) == 64 * 1024
    assert len(response.pieces) == 2 + -(-len(payload) // (64 * 1024))  # head, pieces, tail
    assert all(response.others_ran_between[2:])  # after each piece, the other task got the loop


@pytest.mark.parametrize("size, expected", [(2_000, 1.0), (1_000_000, 1.0), (3_500_000, 3.5)])
def test_a_status_of_megabytes_is_sent_less_often(size, expected):
    assert status_events.pause_after(size, 1.0) == pytest.approx(expected)
