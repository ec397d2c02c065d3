"""Ingest role: claim demanded symbols, watch them through the local Merger,
publish each changed Summary — the very bytes the gRPC streams send — on the
symbol's subject.

Ownership is a lease in the leases bucket (TTL = --nats-lease): `create` only
succeeds if no daemon holds the key, so of all ingest daemons trying, exactly
one wins; the owner rewrites the key (compare-and-set on its revision) every
quarter lease; a daemon that dies stops rewriting and its keys expire, and
the next reconcile pass of a survivor claims them and resyncs the books.
Demand is the demand bucket's keys (`symbol.edge-id`, renewed by the edges)
plus --symbols.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.errors import Error as JetStreamError
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator.merger import (
    AmbiguousSymbol,
    Merger,
    Subscription,
    SymbolListsUnavailable,
    UnknownSymbol,
)
from aggregator.nats import metrics
from aggregator.nats.bus import Bus
from aggregator.nats.keys import KeyView, read_bucket, subscribe_view
# Bytes waiting in nats-py's outgoing buffer beyond which a pump waits for the
# server to catch up (its Summary slot conflates meanwhile) rather than queue.
_MAX_UNSENT = 256 * 1024


@dataclass
class _Owned:
    revision: int
    subscription: Subscription
    last: bytes | None = None  # the latest Summary, republished after a reconnect
    # Referenced here so that the task is not garbage-collected while it waits.
    pump: asyncio.Future[None] | None = field(default=None, repr=False)


class Ingest(Service):
    log = Logger()

    def __init__(
        self,
        bus: Bus,
        merger: Merger,
        *,
        pinned: Iterable[str] = (),
        max_symbols: int = 100,
        clock: Any,
    ) -> None:
        self.bus = bus
        self.merger = merger
        self.pinned = frozenset(pinned)
        self.max_symbols = max_symbols
        self.clock = clock
        lease = bus.config.lease
        self.leases = KeyView(lease, clock)
        self.demand = KeyView(lease, clock)
        self.demand.add_listener(self._demand_written)
        self.owned: dict[str, _Owned] = {}
        # Renew every quarter lease: three renewals may be lost before expiry.
        self._ticker = LoopingCall(self._request_reconcile)
        self._ticker.clock = clock
        self._interval = lease / 4
        self._reconciling = False
        self._again = False
        self._random = random.Random()
        bus.add_listener(self)

    # -- life cycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._ticker.start(self._interval, now=False)
        for feed in self.merger.feeds.values():
            feed.when_symbols_loaded().addCallback(lambda _: self._publish_catalog())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._ticker.running:
            self._ticker.stop()
        # Hand the symbols over now rather than after the lease expires.
        released: Deferred[None] = Deferred.fromFuture(asyncio.ensure_future(self._release_all()))
        self.bus.finish_before_close(released)
        return released

    async def _release_all(self) -> None:
        releases = [self._release(symbol, "stopping") for symbol in list(self.owned)]
        try:
            await asyncio.wait_for(asyncio.gather(*releases, return_exceptions=True), 2.0)
        except asyncio.TimeoutError:
            pass  # the leases expire by themselves

    # -- the bus --------------------------------------------------------------

    async def bus_up(self, first: bool) -> None:
        assert self.bus.leases is not None and self.bus.demand is not None
        if first:
            await subscribe_view(self.bus, self.bus.names.leases_bucket, self.leases)
            await subscribe_view(self.bus, self.bus.names.demand_bucket, self.demand)
        self.leases.seed(await read_bucket(self.bus.leases))
        self.demand.seed(await read_bucket(self.bus.demand))
        await self._publish_catalog_now()
        # The stream may be new (a restarted server): our books are current.
        for symbol, owned in list(self.owned.items()):
            if owned.last is not None:
                await self._send(symbol, owned.last)
        self._request_reconcile()

    def bus_down(self) -> None:
        # Books stay up and keep conflating into one slot per symbol: nothing
        # is buffered, the latest is republished after the reconnect.
        pass

    def _demand_written(self, key: str) -> None:
        symbol = key.split(".", 1)[0]
        if symbol not in self.owned and self.leases.get(symbol) is None:
            self._request_reconcile()  # a new symbol: claim it now, not at the next tick

    def _publish_catalog(self) -> None:
        if self.bus.connected:
            self.bus.run(self._publish_catalog_now())

    async def _publish_catalog_now(self) -> None:
        assert self.bus.catalog is not None
        for name, feed in self.merger.feeds.items():
            listed = feed.listed_symbols()
            if listed is not None:
                await self.bus.catalog.put(name, json.dumps(sorted(listed)).encode())

    # -- leases ---------------------------------------------------------------

    def _request_reconcile(self) -> None:
        if not self.bus.connected or not self.running:
            return
        if self._reconciling:
            self._again = True
            return
        self._reconciling = True
        self.bus.run(self._reconcile_until_settled())

    async def _reconcile_until_settled(self) -> None:
        try:
            while True:
                self._again = False
                await self._reconcile()
                if not self._again:
                    return
        finally:
            self._reconciling = False

    def wanted(self) -> set[str]:
        """Demanded or pinned symbols that a local exchange lists."""
        symbols = {key.split(".", 1)[0] for key in self.demand.keys()} | self.pinned
        wanted = set()
        for symbol in symbols:
            try:
                self.merger.listing_feeds(symbol)
            except (UnknownSymbol, SymbolListsUnavailable, AmbiguousSymbol):
                continue
            wanted.add(symbol)
        return wanted

    async def _reconcile(self) -> None:
        wanted = self.wanted()
        await asyncio.gather(*(
            self._renew(symbol) if symbol in wanted else self._release(symbol, "no demand left")
            for symbol in list(self.owned)
        ))
        candidates = [
            s for s in wanted if s not in self.owned and self.leases.get(s) is None
        ]
        # Random order: daemons claiming at the same moment share the symbols out.
        self._random.shuffle(candidates)
        for symbol in candidates:
            if len(self.owned) >= self.max_symbols or not self.bus.connected:
                break
            await self._claim(symbol)
        metrics.OWNED.set(len(self.owned))

    async def _claim(self, symbol: str) -> None:
        assert self.bus.leases is not None
        try:
            revision = await self.bus.leases.create(symbol, self.bus.daemon_id.encode())
        except KeyWrongLastSequenceError:
            return  # another daemon holds it
        if symbol in self.owned or not self.running:
            return
        subscription = self.merger.subscribe(symbol)
        owned = self.owned[symbol] = _Owned(revision, subscription)
        owned.pump = asyncio.ensure_future(self._pump(symbol, owned))
        metrics.CLAIMS.inc()
        self.log.info("NATS: claimed {symbol}", symbol=symbol)

    async def _renew(self, symbol: str) -> None:
        assert self.bus.leases is not None
        owned = self.owned[symbol]
        value = self.bus.daemon_id.encode()
        try:
            owned.revision = await self.bus.leases.update(symbol, value, last=owned.revision)
            return
        except KeyWrongLastSequenceError:
            pass
        try:
            # Expired without a taker (e.g. NATS restarted, or we were cut off):
            # still ours to take back, with the books kept.
            owned.revision = await self.bus.leases.create(symbol, value)
            return
        except KeyWrongLastSequenceError:
            pass
        metrics.LOST.inc()
        self.log.warn("NATS: lease of {symbol} lost to another daemon", symbol=symbol)
        self._drop(symbol)

    async def _release(self, symbol: str, why: str) -> None:
        assert self.bus.leases is not None and self.bus.js is not None
        owned = self._drop(symbol)
        if owned is None:
            return
        self.log.info("NATS: released {symbol} ({why})", symbol=symbol, why=why)
        if not self.bus.connected:
            return
        try:
            await self.bus.leases.delete(symbol, last=owned.revision)
            # Nobody should see this book as current once nobody keeps it.
            await self.bus.js.purge_stream(
                self.bus.names.summaries_stream,
                subject=self.bus.names.summary_subject(symbol),
            )
        except (NatsError, JetStreamError):
            pass  # taken meanwhile, or the bus went away: the lease expires anyway

    def _drop(self, symbol: str) -> _Owned | None:
        owned = self.owned.pop(symbol, None)
        if owned is not None:
            owned.subscription.end()  # ends the pump
            owned.subscription.close()
            metrics.OWNED.set(len(self.owned))
        return owned

    # -- publishing -----------------------------------------------------------

    async def _pump(self, symbol: str, owned: _Owned) -> None:
        loop = asyncio.get_running_loop()
        while True:
            summary = owned.subscription.take()
            if summary is None:
                summary = await owned.subscription.wait(loop)
                if summary is None:
                    return
            owned.last = summary
            if self.bus.connected:
                await self._send(symbol, summary)

    async def _send(self, symbol: str, summary: bytes) -> None:
        assert self.bus.client is not None
        try:
            # Core publish into the stream's subject: no ack round trip per
            # Summary, and nats-py's outgoing buffer is bounded (pending_size).
            await self.bus.client.publish(self.bus.names.summary_subject(symbol), summary)
            if self.bus.client.pending_data_size > _MAX_UNSENT:
                await self.bus.client.flush(timeout=max(1, round(self.bus.config.lease)))
        except NatsError:
            pass  # disconnected meanwhile: republished after the reconnect
