"""Device health: adaptive timeout from a latency filter, circuit breaker, jittered capped backoff.

Adaptive timeout (RFC 6298 estimator on the reply latency beyond the frame's own wire time):

    srtt   <- 7/8 srtt + 1/8 sample           rttvar <- 3/4 rttvar + 1/4 |srtt - sample|
    timeout = wire_time(request) + clamp(srtt + 4 rttvar, floor, configured timeout)

so a device answering in 5 ms is given up on after ~25 ms instead of the configured 1 s, and a dead
unit on a shared RS-485 bus costs that bus only this bounded time. Every timeout doubles the estimate
(capped at the configured timeout) so a device that slowed down is not starved by a stale filter.

Circuit breaker: `threshold` consecutive failed requests open it; while open the device is not asked
(its tags get BREAKER_OPEN readings at their schedule, costing no bus time); after a jittered, capped,
exponentially growing pause one probe request is let through (half-open): success closes it, failure
reopens it with a longer pause.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Equal-jitter exponential backoff: in [d/2, d] with d = min(cap, base * 2**attempt).

    >>> 0.5 <= backoff(0, 1.0, 30.0) <= 1.0 and 15.0 <= backoff(10, 1.0, 30.0) <= 30.0
    True
    """
    d = min(cap, base * 2.0 ** min(attempt, 30))
    jitter = float((rng or random).uniform(0, d / 2))
    return d / 2 + jitter


@dataclass
class LatencyFilter:
    cap: float  # the configured timeout
    floor: float = 0.02
    srtt: float | None = None
    rttvar: float = 0.0
    backed_off: float = 0.0

    def update(self, sample: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
        self.backed_off = 0.0

    def timeout(self) -> float:
        if self.srtt is None:
            return self.cap
        rto = max(self.srtt + 4 * self.rttvar, self.floor, self.backed_off)
        return min(rto, self.cap)

    def on_timeout(self) -> None:
        self.backed_off = min(2 * self.timeout(), self.cap)


@dataclass
class Breaker:
    threshold: int = 3
    base: float = 1.0
    cap: float = 60.0
    failures: int = 0
    opened: int = 0  # times opened in a row: the backoff exponent
    open_until: float = 0.0
    trips: int = 0  # total, for metrics
    clock: object = field(default=time.monotonic, repr=False)

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self, now: float) -> bool:
        """May a request go to the device now? When open, one probe per pause (half-open)."""
        if not self.is_open:
            return True
        if now >= self.open_until:
            self.open_until = now + backoff(self.opened, self.base, self.cap)
            return True
        return False

    def success(self) -> bool:
        """Record a good reply; True if this closed an open breaker."""
        was_open = self.is_open
        self.failures = 0
        self.opened = 0
        return was_open

    def failure(self, now: float) -> bool:
        """Record a failed request; True if this opened the breaker."""
        self.failures += 1
        if self.failures == self.threshold:
            self.trips += 1
            self.open_until = now + backoff(self.opened, self.base, self.cap)
            return True
        if self.failures > self.threshold:
            self.opened += 1
            self.open_until = now + backoff(self.opened, self.base, self.cap)
        return False
