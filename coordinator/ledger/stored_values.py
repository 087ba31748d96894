"""Reading numbers and JSON back from the ledger defensively: what an older version wrote must not crash a read.

Before the validation layer (coordinator/validation.py) a bad number could reach SQLite: a
negative gradient norm^2 made the step's norm a Python complex, stored as the text
'(1.2e-17+1j)'; a NaN loss is stored as NULL; a NaN heartbeat metric as NaN inside the
metrics JSON. Reads of such values give NaN (numbers the protocol computes with), None (numbers
the status object shows: its JSON stays standard) or the default (JSON), and log a warning once
per value, so `run_state()` and `status()` keep working on an old ledger and the step goes on.
"""

from __future__ import annotations

import json
import logging
import math

log = logging.getLogger("gptjt.coordinator.ledger")

_warned: set[tuple[str, str]] = set()  # (what, value) pairs already logged
_MAX_WARNED = 1000  # a ledger full of bad values logs this many, not one line per read


def _warn(what: str, value: object, becomes: str) -> None:
    key = (what, repr(value)[:100])
    if key not in _warned and len(_warned) < _MAX_WARNED:
        _warned.add(key)
        log.warning("the ledger holds %s = %.100r, which is not what it should hold; read as %s (written by an "
                    "older version, before its input was validated)", what, value, becomes)


def stored_float(value: object, what: str) -> float:
    """A stored REAL as a float: NULL (SQLite's NaN) -> NaN; text that is no real number -> NaN,
    with a warning."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)  # a REAL, or text such as '1.5' or 'nan'
    except (TypeError, ValueError):
        _warn(what, value, "NaN")
        return math.nan


def stored_norm_sq(value: object, what: str) -> float:
    """A stored gradient norm^2: NaN for NULL, non-numbers and negatives (no norm^2 is negative;
    the ledger's rules refuse a non-finite contribution as poisoned)."""
    number = stored_float(value, what)
    if number < 0:
        _warn(what, value, "NaN")
        return math.nan
    return number


def shown_float(value: object, what: str) -> float | None:
    """A stored number as the status object shows it: None unless finite (its JSON stays standard)."""
    number = stored_float(value, what)
    return number if math.isfinite(number) else None


def stored_json(raw: object, default, what: str):
    """Parsed JSON of the default's type, or the default (NULL, not JSON, another type)."""
    if raw is None or raw == "":
        return default
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        _warn(what, raw, "its default")
        return default
    if not isinstance(value, type(default)):
        _warn(what, raw, "its default")
        return default
    return value


def finite_metrics(metrics: dict, what: str) -> dict:
    """A worker's metrics without the entries that are no finite number or string (NaN stored
    before heartbeats were validated): readers then use their own default."""
    out = {}
    for key, value in metrics.items():
        ok = isinstance(value, str) or (isinstance(value, (int, float)) and math.isfinite(value))
        if ok:
            out[key] = value
        else:
            _warn(f"{what}.{key}", value, "missing")
    return out


class ParsedColumns:
    """A status build's parsed JSON columns (a worker's device, its finite metrics), keyed by the
    text the ledger holds and kept from one build to the next.

    At 10,000 workers a build parsed 20,000 small JSON texts, ~40 % of its time (`gptjt bench
    status`, `by_workers`). Most repeat: a standby's device and metrics change rarely, and many
    workers report the same device. Only the texts the last two builds read are kept (the one
    under way and the one before), so memory follows the swarm, not the run's length. The parsed values are shared between workers and
    between builds: callers read them and never change them."""

    def __init__(self):
        self._last: dict[tuple[str, object], object] = {}  # (what, text) -> value, as the last build read
        self._now: dict[tuple[str, object], object] = {}

    def next_build(self) -> None:
        """Start a build: what the last one read is kept for it, the rest let go."""
        self._last, self._now = self._now, {}

    def device(self, raw: object) -> dict:
        return self._parsed(raw, "workers.device", lambda: stored_json(raw, {}, "workers.device"))

    def metrics(self, raw: object) -> dict:
        return self._parsed(raw, "workers.metrics",
                            lambda: finite_metrics(stored_json(raw, {}, "workers.metrics"), "workers.metrics"))

    def _parsed(self, raw: object, what: str, parse) -> object:
        key = (what, raw)
        value = self._now.get(key, _ABSENT)
        if value is _ABSENT:
            value = self._last.get(key, _ABSENT)
            if value is _ABSENT:
                value = parse()
            self._now[key] = value
        return value


_ABSENT = object()
