"""JSON over HTTP(S) for snapshots and symbol lists (treq, injected reactor)."""

from __future__ import annotations

from typing import Any

import orjson
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.web.client import Agent, HTTPConnectionPool


class HttpError(Exception):
    """A non-2xx answer. `body` is kept short: error pages can be HTML."""

    def __init__(self, url: str, status: int, body: bytes, retry_after: float | None):
        self.url = url
        self.status = status
        self.body = body[:200]
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} from {url}: {self.body!r}")


class JsonHttp:
    """GETs JSON documents from one REST host, a few at a time.

    The concurrency cap keeps a reconnect of many symbols from firing hundreds
    of snapshot requests at once (exchanges ban IPs that do).
    """

    def __init__(self, reactor: Any, concurrency: int = 4, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool._factory.noisy = False  # no "Starting factory" line per connection
        self._client = HTTPClient(Agent(reactor, pool=self._pool))
        self._slots = DeferredSemaphore(concurrency)
        self._timeout = timeout

    def get_json(self, url: str) -> Deferred:
        """Fires with the decoded document; fails with HttpError on non-2xx."""
        return self._slots.run(self._get_json, url)

    async def _get(self, url: str) -> Any:
        response = await self._client.get(url, reactor=self._reactor, timeout=self._timeout)
        body = await treq.content(response)
        if not 200 <= response.code < 300:
            retry_after = response.headers.getRawHeaders(b"retry-after", [None])[0]
            raise HttpError(url, response.code, body, _seconds(retry_after))
        return orjson.loads(body)

    def _get_json(self, url: str) -> Deferred:
        return Deferred.fromCoroutine(self._get(url))

    def close(self) -> Deferred:
        return self._pool.closeCachedConnections()


def _seconds(header: bytes | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
