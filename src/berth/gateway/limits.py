"""Per-route limits: request rate (token bucket), concurrent requests, body size.

The bucket arithmetic is pure (time is passed in), so it is unit-tested without
clocks; the limiter objects only keep one bucket or counter per key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from berth.gateway.errors import BodyTooLarge, ConcurrencyLimited, RateLimited

# Buckets that have refilled completely are indistinguishable from new ones, so
# they are dropped once the table grows past this (bounds memory under many IPs).
_SWEEP_AT: Final = 10_000


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, holding at most ``1 + burst`` (like limit_req's burst)."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        capacity = 1.0 + max(burst, 0)
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if granted, else seconds until one will be available."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


def retry_after_seconds(wait: float) -> int:
    """Retry-After is whole seconds; never tell a client 0 when it was refused."""
    return max(1, math.ceil(wait)) if math.isfinite(wait) else 60


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def __repr__(self) -> str:
        return f"<RateLimiter buckets={len(self._buckets)}>"

    def check(self, route_key: str, key: str, rate: float, burst: int, now: float) -> None:
        """Raise RateLimited (with Retry-After) when this key is over the route's rate."""
        bucket_key = (route_key, key)
        bucket = self._buckets.get(bucket_key)
        if bucket is None or bucket.rate != rate or bucket.capacity != 1.0 + max(burst, 0):
            if len(self._buckets) >= _SWEEP_AT:
                self._sweep(now)
            bucket = self._buckets[bucket_key] = TokenBucket.full(rate, burst, now)
        wait = bucket.take(now)
        if wait > 0.0:
            raise RateLimited(
                f"over the rate limit of {rate:g} requests/s (burst {burst})",
                retry_after=retry_after_seconds(wait),
            )

    def _sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[key]


class ConcurrencyLimiter:
    """In-flight requests per route; ``acquire`` and ``release`` always come in pairs."""

    def __init__(self) -> None:
        self._active: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ConcurrencyLimiter active={dict(self._active)}>"

    def acquire(self, route_key: str, limit: int) -> None:
        n = self._active.get(route_key, 0)
        if n >= limit:
            raise ConcurrencyLimited(
                f"route has {n} requests in flight (limit {limit})", retry_after=1
            )
        self._active[route_key] = n + 1

    def release(self, route_key: str) -> None:
        n = self._active.get(route_key, 0) - 1
        if n > 0:
            self._active[route_key] = n
        else:
            self._active.pop(route_key, None)

    def active(self, route_key: str) -> int:
        return self._active.get(route_key, 0)


def check_body_size(size: int, limit: int | None) -> None:
    """Raise BodyTooLarge when ``size`` bytes (declared or received so far) exceed the limit."""
    if limit is not None and size > limit:
        raise BodyTooLarge(f"request body is larger than the route's limit of {limit} bytes")
