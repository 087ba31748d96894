"""The status JSON gzipped for the Status RPC, and read back with a bound on what it inflates to.

At 10,000 workers the status object is ~6 MB of JSON. Sent whole as one reply, the coordinator's
event loop spent ~3-8 ms per Status call on it (a str of it, the protobuf message, its
serialization, gRPC's copies: a loop timer ran late by that much each call, by hand,
2026-12-08), and under load the heartbeats queued behind those stalls were the remaining tail
of `gptjt bench heartbeat`. Gzipped at level 1 it is ~0.26 MB (23x smaller) in ~11 ms, done
once per build by the status process, off the loop, and read by the operator in ~9 ms.
"""

from __future__ import annotations

import gzip
import zlib

# zlib's fastest level: level 6 makes it ~15 % smaller (0.22 MB) in twice the time.
LEVEL = 1
# What a gzipped status may inflate to: the same bound as a status sent as JSON
# (gptjt_cli/operator_client.py STATUS_OPTIONS, gRPC's receive limit).
MAX_STATUS_BYTES = 256 * 1024 * 1024


class BadStatusGzip(ValueError):
    """A gzipped status that is not one whole gzip member, or inflates past its bound."""


def gzip_status(body: bytes) -> bytes:
    """`body` as one gzip member (no file name, mtime 0: the same body gives the same bytes)."""
    return gzip.compress(body, LEVEL, mtime=0)


def gunzip_status(data: bytes, max_bytes: int = MAX_STATUS_BYTES) -> bytes:
    """The JSON bytes inside `data`, refusing a truncated or corrupt member, trailing bytes, or
    one that inflates past `max_bytes` (a few hundred bytes can inflate to gigabytes)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing: header, CRC-32, length
    try:
        body = inflater.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise BadStatusGzip(f"the gzipped status ({len(data)} bytes) is corrupt: {e}; ask again, and if it "
                            "persists, ask without accept_gzip") from None
    if len(body) > max_bytes:
        raise BadStatusGzip(f"the gzipped status ({len(data)} bytes) inflates past {max_bytes} bytes; refused")
    if not inflater.eof or inflater.unused_data:
        raise BadStatusGzip(f"the gzipped status ({len(data)} bytes) is "
                            + ("truncated" if not inflater.eof else f"followed by {len(inflater.unused_data)} "
                               "bytes that are not part of it") + "; ask again")
    return body
