"""Request budget for one REST host: weight per minute, concurrency, bans.

Exchanges ban IPs that fetch too many snapshots too fast (Binance: 429, then
418 for minutes to days). Every REST request of a feed goes through one
RestLimiter: a token bucket refilled at the per-minute weight budget (a small
burst allowance staggers a reconnect of hundreds of symbols instead of firing
them at once), a cap on requests in flight, and a hard stop until Retry-After
once the host has said 429 or 418.
"""

from __future__ import annotations

from collections import deque
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class RestLimiter:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        weight_per_minute: float,
        concurrency: int = 4,
        burst_seconds: float = 5.0,
    ) -> None:
        self._clock = clock
        self._concurrency = concurrency
        self._burst_seconds = burst_seconds
        self._in_flight = 0
        self._waiting: deque[tuple[float, Deferred[None]]] = deque()
        self._timer: IDelayedCall | None = None
        self.blocked_until = 0.0
        self.set_budget(weight_per_minute)
        self._tokens = self._capacity
        self._refilled_at = clock.seconds()

    def set_budget(self, weight_per_minute: float) -> None:
        """E.g. from the exchange's own published limits, read at start-up."""
        self.weight_per_minute = weight_per_minute
        self._rate = weight_per_minute / 60.0
        self._capacity = max(self._rate * self._burst_seconds, 1.0)

    def acquire(self, weight: float) -> Deferred[None]:
        """Fires once the request may go; call release() when it is done."""
        ready: Deferred[None] = Deferred(self._cancel_waiter)
        self._waiting.append((min(weight, self._capacity), ready))
        self._pump()
        return ready

    def release(self) -> None:
        self._in_flight -= 1
        self._pump()

    def block(self, seconds: float, status: int) -> None:
        """The host answered 429/418: nothing goes until Retry-After elapses."""
        until = self._clock.seconds() + seconds
        if until > self.blocked_until:
            self.blocked_until = until
            self.log.warn(
                "REST host said {status}: pausing all its requests for {seconds:.0f}s",
                status=status, seconds=seconds,
            )
        self._tokens = 0.0
        self._pump()

    def _cancel_waiter(self, ready: Deferred[None]) -> None:
        self._waiting = deque(entry for entry in self._waiting if entry[1] is not ready)

    def _refill(self, now: float) -> None:
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now

    def _pump(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self._clock.seconds()
        self._refill(now)
        while self._waiting and self._in_flight < self._concurrency:
            if now < self.blocked_until:
                self._timer = self._clock.callLater(self.blocked_until - now, self._pump)
                return
            weight, ready = self._waiting[0]
            if self._tokens < weight:
                wait = (weight - self._tokens) / self._rate
                self._timer = self._clock.callLater(wait, self._pump)
                return
            self._waiting.popleft()
            self._tokens -= weight
            self._in_flight += 1
            ready.callback(None)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
