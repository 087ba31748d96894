"""Token buckets: how often a key (a join token) may act, with a burst for a fleet starting at once."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_s: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000):
        """per_s: the sustained rate per key; burst: how many at once after a quiet spell; max_keys
        bounds memory (the least recently used key is forgotten, which only ever gives it a fresh burst)."""
        self.per_s, self.burst, self.clock, self.max_keys = per_s, burst, clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)  # re-inserted: most recently used last
        if len(self._buckets) > self.max_keys:
            self._buckets.pop(next(iter(self._buckets)))
        return allowed
