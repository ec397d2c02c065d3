"""JSON over HTTP(S) for snapshots and symbol lists (treq, injected reactor)."""

from __future__ import annotations

from typing import Any, Protocol

import orjson
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from aggregator.ratelimit import RestLimiter
from aggregator.reactor import IDaemonReactor

# Statuses by which a host says "too many requests": stop asking until Retry-After.
BACK_OFF_STATUSES = (418, 429)
DEFAULT_RETRY_AFTER = 60.0


class HttpError(Exception):
    """A non-2xx answer. `body` is kept short: error pages can be HTML."""

    def __init__(self, url: str, status: int, body: bytes, retry_after: float | None):
        self.url = url
        self.status = status
        self.body = body[:200]
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} from {url}: {self.body!r}")


class HttpObserver(Protocol):
    """Sees every answer (--record, aggregator/recording.py)."""

    def responded(self, url: str, status: int, body: bytes) -> None: ...


class JsonHttp:
    """GETs JSON documents from one REST host within its request budget."""

    def __init__(
        self, reactor: IDaemonReactor, limiter: RestLimiter | None = None, timeout: float = 10.0
    ) -> None:
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool._factory.noisy = False  # no "Starting factory" line per connection
        self._client = HTTPClient(Agent(reactor, pool=self._pool))
        self.limiter = limiter if limiter is not None else RestLimiter(reactor, 1200.0)
        self._timeout = timeout
        self.observer: HttpObserver | None = None  # set by the feed when recording

    def get_json(self, url: str, weight: float = 1.0) -> Deferred[Any]:
        """Fires with the decoded document; fails with HttpError on non-2xx."""
        return Deferred.fromCoroutine(self._get(url, weight))

    async def _get(self, url: str, weight: float) -> Any:
        await self.limiter.acquire(weight)
        try:
            response = await self._client.get(url, reactor=self._reactor, timeout=self._timeout)
            body = await treq.content(response)
        finally:
            self.limiter.release()
        if self.observer is not None:
            self.observer.responded(url, response.code, body)
        if not 200 <= response.code < 300:
            retry_after = _seconds(response.headers.getRawHeaders(b"retry-after", [None])[0])
            if response.code in BACK_OFF_STATUSES:
                self.limiter.block(retry_after or DEFAULT_RETRY_AFTER, response.code)
            raise HttpError(url, response.code, body, retry_after)
        return orjson.loads(body)

    def close(self) -> Deferred[None]:
        self.limiter.stop()
        closed: Deferred[None] = self._pool.closeCachedConnections()  # untyped in Twisted
        return closed


def _seconds(header: bytes | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
