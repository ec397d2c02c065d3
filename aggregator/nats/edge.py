"""Edge role: the gRPC API's source of Summaries is NATS instead of a Merger.

For each symbol its clients want, the edge announces demand (a key
`symbol.edge-id` in the demand bucket, rewritten every third of a lease so it
vanishes with the edge), subscribes to the symbol's subject and fetches the
stream's last message for it (a late joiner gets the current book at once).
Summaries are forwarded as received, byte for byte, through the same
conflating Subscription slots the Merger uses. When the bus is lost, or no
ingest daemon holds the symbol's lease, clients get a Summary with no levels
and every exchange STALE or SYNCING with the reason: never a frozen book that
looks live.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Iterable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator import metrics as daemon_metrics
from aggregator._proto import orderbook_pb2
from aggregator.book import BookState
from aggregator.merger import (
    InvalidView,
    Subscription,
    SymbolListsUnavailable,
    TooManySymbols,
    UnknownSymbol,
    serialize_summary,
)
from aggregator.nats import metrics
from aggregator.nats.bus import Bus
from aggregator.nats.keys import KeyView, read_bucket, subscribe_view
from aggregator.nats.names import kv_subject_prefix
from aggregator.throttled_log import ThrottledLog

BUS_LOST = "message bus disconnected"
NO_OWNER = "no ingest daemon holds the symbol"


def is_summary(data: bytes) -> bool:
    """A Summary an ingest daemon sent: it decodes and names its exchanges
    (every Summary does: a symbol is watched only where an exchange lists it)."""
    try:
        return len(orderbook_pb2.Summary.FromString(data).exchanges) > 0
    except DecodeError:
        return False


class _Symbol:
    __slots__ = (
        "subscriptions", "shown", "placeholder", "nats", "subscribing", "since", "heard", "incoming"
    )

    def __init__(self, since: float) -> None:
        self.subscriptions: set[Subscription] = set()
        self.shown: bytes | None = None  # what clients were last given
        self.placeholder: str | None = None  # its reason, if it is a placeholder
        self.nats: NatsSubscription | None = None
        self.subscribing = False
        self.since = since  # when demand started: the owner gets a lease's time to appear
        self.heard = False  # a Summary arrived since the subscription was (re)made
        self.incoming: bytes | None = None  # received, not yet offered to the clients


class Edge(Service):
    """The Summary source of an edge's AggregatorServicer, and its health feed."""

    log = Logger()
    name: str = "edge"  # the feed name health reports ("up: edge")

    def __init__(self, bus: Bus, clock: Any) -> None:
        self.bus = bus
        self.clock = clock
        self.leases = KeyView(bus.config.lease, clock)
        self.catalog: dict[str, frozenset[str]] = {}
        self.dropped = 0
        self._symbols: dict[str, _Symbol] = {}
        self._arrived: set[_Symbol] = set()  # symbols with an `incoming` Summary
        self._flush_call: Any = None
        self._waiters: list[Deferred[None]] = []
        self._listeners: list[Callable[[str, bool], None]] = []
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self._interval = bus.config.lease / 3
        self._throttled = ThrottledLog(self.log, clock)
        bus.add_listener(self)

    # -- the servicer's source (SummarySource) ---------------------------------

    def subscribe(
        self,
        symbol: str,
        max_symbols: int | None = None,
        exchanges: Iterable[str] = (),
        depth: int = 0,
    ) -> Subscription:
        if tuple(exchanges) or depth:
            # The bus carries each symbol's one Summary (every exchange, the
            # ingest daemons' --depth): a narrower view needs the books.
            raise InvalidView(
                "an edge streams every exchange at the ingest daemons' depth: "
                "Request.exchanges and Request.depth are served by a daemon with books"
            )
        listing = self.listing(symbol)
        if not listing:
            raise UnknownSymbol(
                f"symbol {symbol!r} is not listed by any exchange "
                f"({', '.join(sorted(self.catalog))})"
            )
        state = self._symbols.get(symbol)
        if state is None:
            if max_symbols is not None and len(self._symbols) >= max_symbols:
                raise TooManySymbols(
                    f"cannot watch {symbol!r}: the daemon already watches its limit "
                    f"of {max_symbols} symbols"
                )
            state = self._symbols[symbol] = _Symbol(self.clock.seconds())
            if self.bus.connected:
                self._show_placeholder(symbol, state, BookState.SYNCING, "waiting for the owner's book")
                self.bus.run(self._open(symbol, state))
            else:
                self._show_placeholder(symbol, state, BookState.STALE, BUS_LOST)
        subscription = Subscription(symbol, self._unsubscribe)
        state.subscriptions.add(subscription)
        assert state.shown is not None
        subscription.offer(state.shown)
        return subscription

    def when_symbol_lists_loaded(self) -> Deferred[None]:
        return self.when_symbols_loaded()

    def listing(self, symbol: str) -> list[str]:
        """Exchanges listing `symbol`; SymbolListsUnavailable before any list arrived."""
        if not self.catalog:
            raise SymbolListsUnavailable(
                "no ingest daemon has published the exchanges' symbol lists on NATS yet"
            )
        return sorted(name for name, symbols in self.catalog.items() if symbol in symbols)

    # -- health (a HealthFeed) -------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.bus.connected

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        self._listeners.append(listener)

    def listed_symbols(self) -> frozenset[str] | None:
        if not self.catalog:
            return None
        return frozenset().union(*self.catalog.values())

    def when_symbols_loaded(self) -> Deferred[None]:
        if self.catalog:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    # -- life cycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._ticker.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._ticker.running:
            self._ticker.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        for state in self._symbols.values():
            for subscription in list(state.subscriptions):
                subscription.end()
        withdrawn: Deferred[None] = Deferred.fromFuture(asyncio.ensure_future(self._withdraw_demand()))
        self.bus.finish_before_close(withdrawn)
        return withdrawn

    async def _withdraw_demand(self) -> None:
        if not self.bus.connected:
            return
        deletes = [self._delete_demand(symbol) for symbol in self._symbols]
        try:
            await asyncio.wait_for(asyncio.gather(*deletes, return_exceptions=True), 2.0)
        except asyncio.TimeoutError:
            pass  # the keys expire by themselves

    # -- the bus -----------------------------------------------------------------

    async def bus_up(self, first: bool) -> None:
        assert self.bus.leases is not None and self.bus.catalog is not None
        if first:
            await subscribe_view(self.bus, self.bus.names.leases_bucket, self.leases)
            await self._subscribe_catalog()
        self.leases.seed(await read_bucket(self.bus.leases))
        for name, value in await read_bucket(self.bus.catalog):
            self._catalog_written(name, value)
        for listener in list(self._listeners):
            listener(self.name, True)
        for symbol, state in list(self._symbols.items()):
            state.heard = False
            await self._open(symbol, state)

    def bus_down(self) -> None:
        for listener in list(self._listeners):
            listener(self.name, False)
        for symbol, state in self._symbols.items():
            state.incoming = None  # older than the disconnection: not to be shown after it
            self._show_placeholder(symbol, state, BookState.STALE, BUS_LOST)

    async def _subscribe_catalog(self) -> None:
        assert self.bus.client is not None
        prefix = kv_subject_prefix(self.bus.names.catalog_bucket)

        async def written(msg: Msg) -> None:
            self._catalog_written(msg.subject[len(prefix):], msg.data)

        await self.bus.client.subscribe(prefix + ">", cb=written)

    def _catalog_written(self, exchange: str, value: bytes) -> None:
        try:
            symbols = frozenset(json.loads(value))
        except ValueError:
            return
        self.catalog[exchange] = symbols
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- one symbol ----------------------------------------------------------------

    def _demand_key(self, symbol: str) -> str:
        return f"{symbol}.{self.bus.daemon_id}"

    async def _open(self, symbol: str, state: _Symbol) -> None:
        """Subscribe (once: nats-py resubscribes after reconnects), announce demand,
        then show the stored last Summary unless a live one came first."""
        client, js, demand = self.bus.client, self.bus.js, self.bus.demand
        assert client is not None and js is not None and demand is not None
        subject = self.bus.names.summary_subject(symbol)
        if state.nats is None and not state.subscribing:
            async def received(msg: Msg) -> None:
                self._received(symbol, state, msg.data)

            # Flagged across the await: a client's first stream and a reconnect
            # may open the same symbol at once, and one subscription is enough.
            state.subscribing = True
            try:
                subscription = await client.subscribe(subject, cb=received)
            finally:
                state.subscribing = False
            if self._symbols.get(symbol) is not state:
                await subscription.unsubscribe()  # the last client left meanwhile
                return
            state.nats = subscription
        await demand.put(self._demand_key(symbol), b"")
        if self._symbols.get(symbol) is not state:
            await self._delete_demand(symbol)  # the last client left during the put
            return
        try:
            last = await js.get_last_msg(self.bus.names.summaries_stream, subject)
        except NotFoundError:
            return
        if state.heard or self._symbols.get(symbol) is not state or last.data is None:
            return
        if self.leases.get(symbol) is None:
            return  # left by an owner that is gone: not current
        self._received(symbol, state, last.data)

    def _received(self, symbol: str, state: _Symbol, data: bytes) -> None:
        if not is_summary(data):
            self.dropped += 1
            metrics.DROPPED.inc()
            self._throttled.warn(
                ("malformed", symbol),
                "NATS: dropped a message on {symbol}'s subject that is not a Summary ({size} bytes)",
                symbol=symbol,
                size=len(data),
            )
            return
        if self._symbols.get(symbol) is not state:
            return
        state.heard = True
        # Offered once per reactor turn: nats-py hands over a backlog message by
        # message in one turn, and only the newest of a symbol matters (a
        # client holds one Summary at most anyway).
        state.incoming = data
        self._arrived.add(state)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        arrived, self._arrived = self._arrived, set()
        for state in arrived:
            if state.incoming is not None:
                summary, state.incoming = state.incoming, None
                self._show(state, summary, None)

    def _show(self, state: _Symbol, summary: bytes, placeholder: str | None) -> None:
        state.shown = summary
        state.placeholder = placeholder
        conflated = 0
        for subscription in state.subscriptions:
            conflated += subscription.offer(summary)
        if conflated:
            daemon_metrics.SUMMARIES_CONFLATED.inc(conflated)

    def _show_placeholder(
        self, symbol: str, state: _Symbol, book_state: BookState, reason: str
    ) -> None:
        if state.placeholder == reason:
            return
        try:
            exchanges = self.listing(symbol)
        except SymbolListsUnavailable:
            exchanges = []
        summary = serialize_summary(
            [], [], [(name, book_state, reason) for name in exchanges],
            int(self.clock.seconds() * 1_000_000),
        )
        self._show(state, summary, reason)

    def _unsubscribe(self, subscription: Subscription) -> None:
        symbol = subscription.symbol
        state = self._symbols[symbol]
        state.subscriptions.discard(subscription)
        if state.subscriptions:
            return
        del self._symbols[symbol]
        if state.nats is not None:
            self.bus.run(state.nats.unsubscribe())
        if self.bus.connected:
            self.bus.run(self._delete_demand(symbol))

    async def _delete_demand(self, symbol: str) -> None:
        assert self.bus.demand is not None
        try:
            await self.bus.demand.delete(self._demand_key(symbol))
        except (NatsError, JetStreamError):
            pass  # it expires by itself

    # -- every third of a lease ------------------------------------------------------

    def _tick(self) -> None:
        if not self.bus.connected:
            return
        assert self.bus.demand is not None
        now = self.clock.seconds()
        for symbol, state in self._symbols.items():
            self.bus.run(self.bus.demand.put(self._demand_key(symbol), b""))
            orphaned = self.leases.get(symbol) is None and now - state.since > self.leases.ttl
            if orphaned:
                self._show_placeholder(symbol, state, BookState.SYNCING, NO_OWNER)
