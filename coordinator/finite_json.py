"""JSON that every browser parses: NaN and ±Infinity become null (RFC 8259 has no such numbers)."""

from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None.

    A heartbeat may report NaN (e.g. a rate over an empty interval); Python's json writes it as
    the bare word NaN, which JSON.parse refuses, so one such number would stop the live page."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value) -> bytes:
    """`value` as strict JSON bytes, any non-finite float written as null.

    json's encoder refuses a non-finite float (allow_nan=False) in C; only then is the value
    walked in Python to replace them. The walk was ~40 ms of the ~180 ms a 10,000-worker
    status took to build and write (`gptjt bench status`, `by_workers.workers_nan_walk_ms`), and
    a status with a non-finite number in it is the exception."""
    try:
        return json.dumps(value, allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity somewhere
        return json.dumps(finite(value), allow_nan=False).encode()
