"""Clients for the simulator's loopback tests, written from PROTOCOLS.md only
(Autobahn client + treq), never with the daemon's feed code."""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import orjson
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import HTTPConnectionPool

from aggregator.simulator import SimulatorService

TIMEOUT = 3.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def sleep(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    _reactor().callLater(seconds, d.callback, None)
    await d


async def until(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await sleep(0.01)


class Client(WebSocketClientProtocol):
    """Keeps raw payloads (bad frames need not parse), pongs, and how the connection closed."""

    def connectionMade(self) -> None:
        self.raw: defer.DeferredQueue = defer.DeferredQueue()
        self.pongs: list[bytes] = []
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        super().connectionMade()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.raw.put(payload)

    def onPong(self, payload: bytes) -> None:
        self.pongs.append(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.close_code, self.close_reason = code, reason

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.opened.called:
            self.opened.errback(reason)
        self.closed.callback(None)

    def send(self, message: Any) -> None:
        self.sendMessage(message if isinstance(message, bytes) else orjson.dumps(message), isBinary=False)

    async def next_raw(self, timeout: float = TIMEOUT) -> bytes:
        return await self.raw.get().addTimeout(timeout, _reactor())

    async def next(self, timeout: float = TIMEOUT) -> Any:
        return orjson.loads(await self.next_raw(timeout))

    async def next_matching(self, predicate: Any, timeout: float = TIMEOUT) -> Any:
        while True:
            message = await self.next(timeout)
            if predicate(message):
                return message

    async def next_data(self, timeout: float = TIMEOUT) -> Any:
        return await self.next_matching(
            lambda m: "stream" in m or m.get("event") == "data", timeout
        )

    def pending(self) -> list:
        """Messages received and not yet read, decoded."""
        out = []
        while self.raw.pending:
            out.append(orjson.loads(self.raw.pending.pop(0)))
        return out

    async def close(self) -> None:
        if not self.closed.called:
            self.transport.loseConnection()
        await self.closed


async def connect(url: str) -> Client:
    parts = urlsplit(url)
    factory = WebSocketClientFactory(url)
    factory.protocol = Client
    endpoint = TCP4ClientEndpoint(_reactor(), parts.hostname, parts.port, timeout=TIMEOUT)
    client = await endpoint.connect(factory)
    await client.opened.addTimeout(TIMEOUT, _reactor())
    return client


@contextlib.asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[SimulatorService]:
    reactor = _reactor()
    before = set(reactor.getDelayedCalls())
    sim = SimulatorService(**kwargs)  # reactor=None: the global (asyncio) reactor
    sim.startService()
    try:
        yield sim
    finally:
        await sim.stopService()
        assert sim.connection_count == 0
        # Let client-side connectionLost handlers run, then nothing of ours is left ticking.
        await sleep(0.01)
        leftover = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
        assert leftover == [], leftover


async def get(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any, bytes]:
    pool = HTTPConnectionPool(_reactor(), persistent=False)
    response = await treq.request(method, url, pool=pool, timeout=TIMEOUT, **kwargs)
    return response.code, response.headers, await response.content()


class Reference:
    """An independent book: decimal strings applied by the rules of PROTOCOLS §0."""

    def __init__(self, bids: Any, asks: Any) -> None:
        self.sides: tuple[dict[float, float], dict[float, float]] = ({}, {})
        self.apply(bids, asks)

    def apply(self, bids: Any, asks: Any) -> None:
        for side, levels in zip(self.sides, (bids, asks)):
            for p, a in levels:
                if float(a) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = float(a)

    def lists(self) -> tuple[list, list]:
        return sorted(self.sides[0].items(), reverse=True), sorted(self.sides[1].items())
