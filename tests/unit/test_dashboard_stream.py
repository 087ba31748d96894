"""The dashboard's live status stream (/api/stream) when the page goes away mid-stream."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from coordinator.dashboard import http as dashboard_http


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
    assert response.writes == 3  # "retry", one status, and the write that found the page gone
