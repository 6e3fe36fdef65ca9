"""Per-caller rate limits on generation (requests and images per window), with the `limits` library.

The caller is the API key (its digest) when keys are configured, else the client address. A request over either
limit is refused with 429 and Retry-After (the seconds until the window lets it through); nothing is counted for a
refused request's images. RATE_LIMIT_REQUESTS and RATE_LIMIT_IMAGES take `limits`' notation, e.g. '60/minute'.
"""

from __future__ import annotations

import math
import time

from limits import parse, storage, strategies

from .scheduler import JobError


class RateLimits:
    def __init__(self, requests: str | None, images: str | None):
        self.requests = parse(requests) if requests else None
        self.images = parse(images) if images else None
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def check(self, caller: str, n: int) -> None:
        """Raise JobError rate_limited if a request of n images would go over a limit (counts nothing)."""
        for item, cost, what in ((self.requests, 1, "requests"), (self.images, n, "images")):
            if item is None:
                continue
            if not self._limiter.test(item, what, caller, cost=cost):
                stats = self._limiter.get_window_stats(item, what, caller)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise JobError("rate_limited", f"rate limit: at most {item} {what} per caller; retry in {wait} s",
                               retry_after=wait)

    def hit(self, caller: str, n: int) -> None:
        """Count an accepted request of n images."""
        for item, cost, what in ((self.requests, 1, "requests"), (self.images, n, "images")):
            if item is not None:
                self._limiter.hit(item, what, caller, cost=cost)
