"""The bandwidth budget of a node's protection traffic: a token bucket and a send-rate meter. Pure.

Why: cross-node parity can take the network from training's own collectives (REFT's authors moved
off cross-node coding for it; Gemini schedules checkpoint traffic into idle time). ``protect_bandwidth``
caps the bytes per second a daemon's peer links send; ``links.PeerLinks`` asks ``SendBudget`` before
each message. Bulk messages (those with a payload: protection chunks, the blocks a rebuild or a moved
rank fetches) wait for the budget; small control messages (coordination, queries, acknowledgements)
never wait, since a late heartbeat would look like a lost node, but their bytes are spent too, so
the budget holds for everything the links send.

The bucket may go into debt: a message is let through whenever the balance is positive, whatever its
size, and later ones wait until the debt is paid. So a frame larger than the burst still goes out,
and over any interval T the bytes sent stay within ``rate * T + burst + one message``.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

BURST_SECONDS = 0.05     # the bucket holds this many seconds of the rate: short bursts, no long catch-up
METER_WINDOW = 1.0       # seconds over which the send rate is measured


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` bytes saved up; the balance may go negative."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs rate > 0 and burst > 0, got {rate} and {burst}")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def ready(self) -> bool:
        """Whether a message may go now (the balance is positive)."""
        self._refill()
        return self.tokens > 0

    def spend(self, nbytes: int) -> None:
        """``nbytes`` went out (or must go, ready or not)."""
        self._refill()
        self.tokens -= nbytes

    def delay(self) -> float:
        """Seconds until ``ready()`` (0 if it is now)."""
        self._refill()
        return 0.0 if self.tokens > 0 else (-self.tokens + 1) / self.rate


class RateMeter:
    """Bytes per second over the last ``window`` seconds, and the highest such rate seen."""

    def __init__(self, window: float = METER_WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._in_window = 0
        self.total = 0
        self.peak = 0.0
        self._started = clock()

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window:
            self._in_window -= self._events.popleft()[1]

    def add(self, nbytes: int) -> None:
        now = self.clock()
        self._expire(now)
        self._events.append((now, nbytes))
        self._in_window += nbytes
        self.total += nbytes
        if now - self._started >= self.window:  # a full window behind it: a rate, not a start-up burst
            self.peak = max(self.peak, self._in_window / self.window)

    def rate(self) -> float:
        """Bytes per second sent in the last window."""
        self._expire(self.clock())
        return self._in_window / self.window


class SendBudget:
    """One daemon's budget: ``rate`` bytes per second (0: unlimited), the bytes measured as they go."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        if rate < 0:
            raise ValueError(f"protect_bandwidth must be >= 0 bytes per second (0: unlimited), got {rate}")
        self.rate = rate
        self.bucket = TokenBucket(rate, max(1.0, rate * BURST_SECONDS), clock) if rate else None
        self.meter = RateMeter(clock=clock)
        self.waits = 0           # times a bulk message found the budget spent and waited

    def ready(self) -> bool:
        """Whether a bulk message may go now; a False is counted as a wait (the caller retries later)."""
        if self.bucket is None or self.bucket.ready():
            return True
        self.waits += 1
        return False

    def sent(self, nbytes: int) -> None:
        """``nbytes`` left through the links (bulk or control)."""
        if self.bucket is not None:
            self.bucket.spend(nbytes)
        self.meter.add(nbytes)

    def status(self) -> dict:
        """JSON-ready: the budget (bytes/s, 0 unlimited), the send rate over the last second, the highest
        one-second rate seen, bytes sent in all, and how often a bulk message waited."""
        return {"budget_bytes_per_second": self.rate, "send_rate_bytes_per_second": round(self.meter.rate()),
                "peak_send_rate_bytes_per_second": round(self.meter.peak), "sent_bytes": self.meter.total,
                "waits": self.waits, "window_seconds": self.meter.window}
