"""One venue's feed, composed: its symbol list, its connection pool and its
venue adapter. This is the part the merger (and health reporting) see.

Nothing here knows a venue's wire format: the adapter
(aggregator/exchanges/<venue>.py, behind venue.VenueAdapter) does.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import ExchangeBook
from aggregator.exchanges.connection import (
    Connection,
    ConnectionObserver,
    Connector,
    Startable,
    websocket_connector,
)
from aggregator.exchanges.pool import ConnectionPool
from aggregator.exchanges.symbol_list import SymbolList
from aggregator.exchanges.venue import AdapterFactory, VenueSettings
from aggregator.http import HttpObserver, JsonHttp
from aggregator.instruments import Instrument
from aggregator.reactor import IDaemonReactor, installed_reactor
from aggregator.ratelimit import RestLimiter
from aggregator.throttled_log import ThrottledLog


class TrafficObserver(ConnectionObserver, HttpObserver, Protocol):
    """Sees a venue's websocket and REST traffic (--record)."""


class VenueFeed(Service):
    """Keeps the watched symbols' books of one venue in sync."""

    log = Logger()
    name: str  # the venue's wire name (set from the adapter)

    def __init__(
        self,
        adapter: AdapterFactory,
        ws_url: str,
        rest_url: str,
        reactor: IDaemonReactor | None = None,
        http: JsonHttp | None = None,
        retry_policy: Callable[[int], float] | None = None,
        connector: Connector | None = None,
        settings: VenueSettings | None = None,
    ) -> None:
        if reactor is None:
            reactor = installed_reactor()
        self._reactor: IDaemonReactor = reactor
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=30.0, jitter=random.random
        )
        self.books: dict[str, ExchangeBook] = {}
        self.problems = ThrottledLog(self.log, reactor)
        self._connection_listeners: list[Callable[[str, bool], None]] = []
        self._http: JsonHttp | None = http
        self.observer: TrafficObserver | None = None
        self.adapter = adapter(self)
        self.name = self.adapter.name
        self._settings = settings or self.adapter.settings
        self._messages = metrics.MESSAGES.labels(self.name)
        self._reconnects = metrics.RECONNECTS.labels(self.name)
        self.symbol_list = SymbolList(
            self.name,
            "",  # set at start: the REST URL may be changed until then (--demo)
            self.adapter.parse_symbol_list,
            self.http,
            reactor,
            self.retry_delay,
            weight=self.adapter.symbol_list_weight,
        )
        self.pool = ConnectionPool(
            self.name,
            lambda: self.adapter.connection_url(self.ws_url),
            self._settings,
            self,
            reactor,
            self.retry_delay,
            self._observing(connector or websocket_connector(reactor)),
        )
        self._stopped = False

    @property
    def settings(self) -> VenueSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: VenueSettings) -> None:
        """New settings, for connections made from now on (set before start)."""
        self._settings = self.pool.settings = settings

    @property
    def reactor(self) -> IReactorTime:
        return self._reactor

    @property
    def http(self) -> JsonHttp:
        if self._http is None:
            self._http = JsonHttp(
                self._reactor, RestLimiter(self._reactor, self.adapter.settings.rest_weight_per_minute)
            )
        return self._http

    # -- recording (--record) -------------------------------------------------------

    def record_to(self, observer: TrafficObserver) -> None:
        """Show `observer` the traffic of the connections made from now on and every REST answer."""
        self.observer = self.http.observer = observer

    def _observing(self, connector: Connector) -> Connector:
        def connect(connection: Connection) -> Startable:
            connection.observer = self.observer
            return connector(connection)

        return connect

    # -- what the merger (and health reporting) use ------------------------------

    @property
    def connected(self) -> bool:
        return self.pool.connected

    @property
    def connections(self) -> list[Connection]:
        return self.pool.connections

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """listener(exchange name, connected) on every connect and disconnect."""
        self._connection_listeners.append(listener)

    def listed_symbols(self) -> frozenset[str] | None:
        return self.symbol_list.symbols

    def when_symbols_loaded(self) -> Deferred[None]:
        return self.symbol_list.when_loaded()

    def watch(self, book: ExchangeBook) -> None:
        self.books[book.symbol] = book
        if not self._stopped:
            self.pool.add(book.symbol)

    def unwatch(self, symbol: str) -> None:
        if self.books.pop(symbol, None) is None:
            return
        self.adapter.stop_sync(symbol)
        if not self._stopped:
            self.pool.remove(symbol)

    # -- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.symbol_list.url = self.rest_url + self.adapter.symbol_list_path()
        self.symbol_list.start()
        self.pool.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopped = True  # streams closing at shutdown still unwatch symbols
        self.symbol_list.stop()
        for symbol in list(self.books):
            self.adapter.stop_sync(symbol)
        self.adapter.stop()
        return self.pool.stop().addBoth(lambda _: self.http.close())

    # -- FeedContext: what the adapter may use ------------------------------------------

    def instrument(self, symbol: str) -> Instrument:
        return self.symbol_list.instruments[symbol]

    def symbol_of(self, native: str) -> str | None:
        return self.symbol_list.by_native.get(native)

    def retry_delay(self, attempt: int) -> float:
        return float(self.retry_policy(attempt))

    def reject(self, reason: str, format: str, **fields: Any) -> None:
        metrics.REJECTS.labels(self.name, reason).inc()
        self.problems.warn(reason, format, **fields)

    def problem(self, key: object, format: str, **fields: Any) -> None:
        self.problems.warn(key, format, **fields)

    def resubscribe(self, connection: Connection, symbols: list[str], delay: float) -> None:
        self.pool.resubscribe(connection, symbols, delay)

    def subscription_unanswered(self, connection: Connection, symbols: list[str]) -> None:
        metrics.SUBSCRIBE_RETRIES.labels(self.name, "timeout").inc()
        self.problems.warn(
            "subscribe_timeout",
            "{connection}: no answer to subscribing {symbols}; subscribing again",
            connection=connection.label, symbols=symbols,
        )
        self.pool.resubscribe(connection, symbols, 0.0)

    def rotate(self, connection: Connection, reason: str) -> None:
        self.pool.rotate(connection, reason)

    def predecessor(self, connection: Connection) -> Connection | None:
        return self.pool.predecessor(connection)

    # -- PoolEvents ---------------------------------------------------------------------

    def carrier_opened(self, connection: Connection, symbols: dict[str, bool]) -> None:
        if connection.opens > 1:
            self._reconnects.inc()
        for symbol, streaming in symbols.items():
            book = self.books.get(symbol)
            if book is None:
                continue
            self.adapter.stop_sync(symbol)
            if not streaming:
                book.mark_syncing("connected, subscribing")
            self.adapter.start_sync(book, connection, subscribed=streaming)

    def restart_sync(self, connection: Connection, symbol: str) -> None:
        book = self.books.get(symbol)
        if book is not None:
            self.adapter.stop_sync(symbol)
            self.adapter.start_sync(book, connection, subscribed=True)

    def carrier_lost(self, connection: Connection, symbols: list[str], reason: str) -> None:
        self.adapter.connection_reset(connection)
        for symbol in symbols:
            self.adapter.stop_sync(symbol)
            book = self.books.get(symbol)
            if book is not None:
                book.mark_stale(f"disconnected: {reason}")

    def handed_over(self, old: Connection, new: Connection) -> None:
        self.adapter.handover(old, new)
        self.adapter.connection_reset(old)
        self._reconnects.inc()

    def frame_received(self, connection: Connection, payload: bytes, arrival: float) -> None:
        self._messages.inc()
        try:
            message = self.adapter.decode(payload)
        except ValueError as error:  # orjson.JSONDecodeError is one
            self.reject("malformed_json", "{feed}: malformed JSON dropped ({error})",
                        feed=self.name, error=error)
            return
        try:
            self.adapter.handle(connection, message, arrival)
        except Exception:
            self.log.failure("{feed}: cannot handle {message!r}", feed=self.name,
                             message=payload[:200])

    def subscribe_frame(self, connection: Connection, symbols: list[str], active: bool) -> Any:
        if active:
            for symbol in symbols:
                book = self.books.get(symbol)
                if book is not None and self.adapter.synced_on(symbol) is not connection:
                    self.adapter.stop_sync(symbol)
                    self.adapter.start_sync(book, connection, subscribed=False)
        return self.adapter.subscribe_frame(connection, symbols)

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        return self.adapter.unsubscribe_frame(connection, symbols)

    def idle(self, connection: Connection) -> None:
        self.adapter.idle_probe(connection)

    def connectivity_changed(self) -> None:
        connected = self.connected
        for listener in self._connection_listeners:
            listener(self.name, connected)
