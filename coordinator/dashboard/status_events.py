"""One status event on the dashboard's live stream (/api/stream), written so that a large one
neither stalls the coordinator's event loop nor floods the page's link.

At 10,000 workers the status object is ~3.5 MB of JSON (~6.7 MB once every worker's heartbeat
metrics are in it, 2026-12-07). Written as one piece (the event's
"data:" line joined to it, aiohttp's chunk framing joined again, the transport's buffer a third
copy), each event held the loop for ~10-15 ms on 2 cores, and every heartbeat in flight waited
that out: in `gptjt bench heartbeat` (2026-12-05, a watchdog sampling the loop's stack whenever
it ran 8 ms late) these writes overlapped ~110 of the ~450 round trips over the p99, more than
any other code path, ledger work included. So the event goes out in pieces of PIECE_BYTES, and the loop runs whatever
is ready between two pieces. SSE frames events by their blank line, not by how the bytes
arrive, so the page sees the same event.

A page also gets at most BYTES_PER_S of status a second: a 10,000-worker status every ~7 s
instead of every second (54 Mbit/s for each open page, on the operator's link as on the
coordinator's loop); runs whose status is under BYTES_PER_S keep the stream's 1 s pace.
"""

from __future__ import annotations

import asyncio

PIECE_BYTES = 128 * 1024
BYTES_PER_S = 1_000_000
HEAD, TAIL = b"event: status\ndata: ", b"\n\n"


async def write_status_event(response, payload: bytes, piece_bytes: int = PIECE_BYTES) -> None:
    """`payload` (one line of JSON: no newline inside) as one "status" event on `response`
    (aiohttp's StreamResponse), `piece_bytes` at a time, yielding to the loop after each piece."""
    view = memoryview(payload)
    await response.write(HEAD)
    for start in range(0, len(view), piece_bytes):
        await response.write(view[start:start + piece_bytes])
        await asyncio.sleep(0)  # a write that did not have to wait for the socket does not yield
    await response.write(TAIL)


def pause_after(payload_bytes: int, interval_s: float, bytes_per_s: float = BYTES_PER_S) -> float:
    """Seconds until the next event: the stream's interval, or longer for a status so large that
    the interval would send more than `bytes_per_s`."""
    return max(interval_s, payload_bytes / bytes_per_s)
