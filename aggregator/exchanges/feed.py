"""What every exchange feed shares: the symbol list, demand, connections,
make-before-break handover. The exchange modules add their wire format and
sync rules through the hooks at the bottom of ExchangeFeed.
"""

from __future__ import annotations

import random
from typing import Any, Callable, ClassVar, Iterable

import orjson
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from aggregator import metrics
from aggregator.exchanges.connection import Connection
from aggregator.http import JsonHttp
from aggregator.merger import ExchangeBook
from aggregator.ratelimit import RestLimiter
from aggregator.throttled_log import ThrottledLog


class ExchangeFeed(Service):
    """One exchange: connections carrying the watched symbols, each symbol on one.

    Subclasses set the class attributes and implement the hooks; connection
    life, demand bookkeeping, pacing and handover live here.
    """

    name: ClassVar[str]
    # Outbound frames per second per connection; Binance disconnects (then
    # bans) above 5/s and counts pings and pongs too.
    frames_per_second: ClassVar[float] = 10.0
    auto_ping_interval: ClassVar[float] = 30.0
    auto_ping_timeout: ClassVar[float] = 10.0
    # Nothing at all received for this long (not even a ping) → reconnect.
    inactivity_timeout: ClassVar[float] = 60.0
    # A connection that lived less than this counts as a flap: backoff keeps growing.
    healthy_period: ClassVar[float] = 30.0
    # Rotate (make-before-break) before the exchange closes old connections.
    max_connection_age: ClassVar[float | None] = None
    max_symbols_per_connection: ClassVar[int] = 1000
    # A successor connection serves alongside the old one this long before handover.
    handover_overlap: ClassVar[float] = 2.0
    rest_weight_per_minute: ClassVar[float] = 600.0

    log = Logger()

    def __init__(
        self,
        ws_url: str,
        rest_url: str,
        reactor: Any = None,
        http: JsonHttp | None = None,
        retry_policy: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")
        self.reactor = reactor
        self.http = http if http is not None else JsonHttp(
            reactor, RestLimiter(reactor, self.rest_weight_per_minute)
        )
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=30.0, jitter=random.random
        )
        self.books: dict[str, ExchangeBook] = {}
        self.connections: list[Connection] = []
        self.connection_of: dict[str, Connection] = {}
        self.problems = ThrottledLog(self.log, reactor)
        self._connections_made = 0
        self._listed: frozenset[str] | None = None
        self._listed_waiters: list[Deferred] = []
        self._list_attempts = 0
        self._list_request: Deferred | None = None
        self._list_retry: Any = None
        self._connection_listeners: list[Callable[[str, bool], None]] = []
        self._to_start: dict[str, None] = {}  # ordered sets
        self._to_stop: dict[str, None] = {}
        self._demand_flush: Any = None
        self._stopped = False
        self._handover_checks: dict[Connection, Any] = {}
        self._messages = metrics.MESSAGES.labels(self.name)
        self._reconnects = metrics.RECONNECTS.labels(self.name)

    # -- what the merger (and health reporting) use ------------------------------

    @property
    def connected(self) -> bool:
        return any(connection.connected for connection in self.connections)

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """listener(exchange name, connected) on every connect and disconnect."""
        self._connection_listeners.append(listener)

    def listed_symbols(self) -> frozenset[str] | None:
        return self._listed

    def when_symbols_loaded(self) -> Deferred:
        if self._listed is not None:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._listed_waiters.append(waiter)
        return waiter

    def watch(self, book: ExchangeBook) -> None:
        self.books[book.symbol] = book
        self._to_start[book.symbol] = None
        self._schedule_demand_flush()

    def unwatch(self, symbol: str) -> None:
        if self.books.pop(symbol, None) is None:
            return
        self.forget_symbol(symbol)
        if self._to_start.pop(symbol, 1) is not None:  # already placed on a connection
            self._to_stop[symbol] = None
            self._schedule_demand_flush()

    # -- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._load_symbol_list()
        self._add_connection().start()

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopped = True  # streams closing at shutdown still unwatch symbols
        for timer in (self._list_retry, self._demand_flush, *self._handover_checks.values()):
            if timer is not None and timer.active():
                timer.cancel()
        self._list_retry = self._demand_flush = None
        self._handover_checks.clear()
        if self._list_request is not None:
            self._list_request.cancel()
        for symbol in list(self.books):
            self.forget_symbol(symbol)
        stopping = []
        for connection in self.connections:
            if connection.successor is not None:
                stopping.append(connection.successor.stop())
            stopping.append(connection.stop())
        self.connections = []
        return DeferredList(stopping).addBoth(lambda _: self.http.close())

    # -- symbol list ------------------------------------------------------------

    def _load_symbol_list(self) -> None:
        self._list_retry = None
        self._list_request = self.http.get_json(self.rest_url + self.symbol_list_path())
        self._list_request.addCallbacks(self._symbol_list_loaded, self._symbol_list_failed)

    def _symbol_list_loaded(self, document: Any) -> None:
        self._list_request = None
        try:
            listed = frozenset(self.parse_symbol_list(document))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            self._symbol_list_failed(error)
            return
        self._listed = listed
        self.log.info("{feed}: {count} symbols listed", feed=self.name, count=len(listed))
        waiters, self._listed_waiters = self._listed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _symbol_list_failed(self, reason: Any) -> None:
        self._list_request = None
        if not self.running:
            return  # cancelled by stopService
        delay = self.retry_policy(self._list_attempts)
        self._list_attempts += 1
        self.log.warn(
            "{feed}: cannot load the symbol list ({error}); retrying in {delay:.1f}s",
            feed=self.name,
            error=getattr(reason, "value", reason),
            delay=delay,
        )
        self._list_retry = self.reactor.callLater(delay, self._load_symbol_list)

    # -- demand → connections -------------------------------------------------------

    def _schedule_demand_flush(self) -> None:
        # Demand changes made in one reactor turn (a client asking for many
        # symbols, a burst of disconnects) leave as one batch of frames.
        if self._demand_flush is None and not self._stopped:
            self._demand_flush = self.reactor.callLater(0, self._flush_demand)

    def _flush_demand(self) -> None:
        self._demand_flush = None
        to_stop, self._to_stop = list(self._to_stop), {}
        to_start, self._to_start = list(self._to_start), {}
        for connection, symbols in _group(to_stop, lambda s: self.connection_of.pop(s, None)).items():
            for carrier in _with_successor(connection):
                carrier.symbols.difference_update(symbols)
                if carrier.connected:
                    self.stop_symbols(carrier, symbols)
            if not connection.symbols and connection is not self.connections[0]:
                self._retire(connection)
        placed = {symbol: self._place(symbol) for symbol in to_start}
        for connection, symbols in _group(to_start, placed.__getitem__).items():
            if connection.connected:
                self.start_symbols(connection, symbols, handover=False)
            successor = connection.successor
            if successor is not None and successor.connected:
                self.start_symbols(successor, symbols, handover=True)

    def _place(self, symbol: str) -> Connection:
        for connection in self.connections:
            if len(connection.symbols) < self.max_symbols_per_connection:
                break
        else:
            connection = self._add_connection()
            if self.running:
                connection.start()
        for carrier in _with_successor(connection):
            carrier.symbols.add(symbol)
        self.connection_of[symbol] = connection
        return connection

    def _add_connection(self) -> Connection:
        connection = Connection(self, self._next_connection_number())
        self.connections.append(connection)
        return connection

    def _next_connection_number(self) -> int:
        self._connections_made += 1
        return self._connections_made

    def _retire(self, connection: Connection) -> None:
        self.connections.remove(connection)
        for carrier in _with_successor(connection):
            carrier.stop()
        self.log.info("{connection}: no symbols left; closed", connection=connection)

    # -- connection events (from Connection) ------------------------------------------

    def connection_opened(self, connection: Connection) -> None:
        old = connection.replaces
        if old is not None and old.connected:
            self.log.info(
                "{new}: open; subscribing before {old} is closed", new=connection, old=old
            )
            if connection.symbols:
                self.start_symbols(connection, sorted(connection.symbols), handover=True)
            self._check_handover(connection)
            return
        if old is not None:
            self._promote(connection)
        if connection.opens > 1:
            self._reconnects.inc()
        self.log.info("{connection}: connected to {url}", connection=connection,
                      url=self.connection_url())
        symbols = sorted(s for s in connection.symbols if s in self.books)
        for symbol in symbols:
            self.books[symbol].mark_syncing("connected, resubscribing")
        if symbols:
            self.start_symbols(connection, symbols, handover=False)
        self._tell_connection_listeners()

    def frame_received(self, connection: Connection, payload: bytes) -> None:
        self._messages.inc()
        metrics.FRAME_CLOCK.mark(connection.last_activity)  # its arrival, for the latency histogram
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            self.reject("malformed_json", "{feed}: malformed JSON dropped ({error})",
                        feed=self.name, error=error)
            return
        try:
            self.handle(connection, message)
        except Exception:
            self.log.failure("{feed}: cannot handle {message!r}", feed=self.name,
                             message=payload[:200])

    def connection_lost(self, connection: Connection, reason: str) -> None:
        if connection not in self.connections:
            return  # retired, or replaced by its successor
        if self.running:
            self.log.warn("{connection}: disconnected ({reason})", connection=connection,
                          reason=reason)
        for symbol in sorted(connection.symbols):
            self.forget_symbol(symbol)
            if symbol in self.books:
                self.books[symbol].mark_stale(f"disconnected: {reason}")
        successor = connection.successor
        if successor is not None and self.running:
            # Too late for a seamless handover: the successor takes over as a
            # fresh connection (resubscribe and resync).
            connection.stop()
            self._promote(successor)
            if successor.connected:
                self.connection_opened(successor)
        self._tell_connection_listeners()

    def rotate(self, connection: Connection, reason: str) -> None:
        """Replace `connection` make-before-break."""
        if connection.successor is not None or not connection.connected or not self.running:
            return
        self.log.info("{connection}: replacing it ({reason})", connection=connection,
                      reason=reason)
        successor = Connection(self, self._next_connection_number(), replaces=connection)
        connection.successor = successor
        successor.start()

    def _check_handover(self, successor: Connection) -> None:
        self._handover_checks.pop(successor, None)
        old = successor.replaces
        if old is None or old.successor is not successor:
            return
        now = self.reactor.seconds()
        opened_at = successor.opened_at if successor.opened_at is not None else now
        if successor.sending or now - opened_at < self.handover_overlap:
            self._handover_checks[successor] = self.reactor.callLater(
                self.handover_overlap / 4, self._check_handover, successor
            )
            return
        self._promote(successor)
        self.handover_complete(old, successor)
        old.stop()
        self.log.info("{new}: took over from {old}", new=successor, old=old)
        self._reconnects.inc()

    def _promote(self, successor: Connection) -> None:
        old = successor.replaces
        successor.replaces = None
        if old is None:
            return
        old.successor = None
        if old in self.connections:
            self.connections[self.connections.index(old)] = successor
        for symbol in successor.symbols:
            self.connection_of[symbol] = successor

    def _tell_connection_listeners(self) -> None:
        for listener in self._connection_listeners:
            listener(self.name, self.connected)

    # -- helpers for the exchange modules ---------------------------------------------

    def reject(self, reason: str, format: str, **fields: Any) -> None:
        """Count a rejected message and log it once per burst."""
        metrics.REJECTS.labels(self.name, reason).inc()
        self.problems.warn(reason, format, **fields)

    # -- hooks for the exchange modules -------------------------------------------------

    def connection_url(self) -> str:
        return self.ws_url

    def symbol_list_path(self) -> str:
        raise NotImplementedError

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        """The exchange's instrument list → canonical symbols with live books."""
        raise NotImplementedError

    def start_symbols(self, connection: Connection, symbols: list[str], handover: bool) -> None:
        """Subscribe on `connection` and start syncing; with handover, the books
        are already in sync through the connection being replaced: only subscribe."""
        raise NotImplementedError

    def stop_symbols(self, connection: Connection, symbols: list[str]) -> None:
        """Unsubscribe on the open connection."""
        raise NotImplementedError

    def forget_symbol(self, symbol: str) -> None:
        """Drop per-symbol sync state, cancelling its timers and requests."""
        raise NotImplementedError

    def handle(self, connection: Connection, message: Any) -> None:
        """One decoded frame."""
        raise NotImplementedError

    def idle_probe(self, connection: Connection) -> None:
        """Nothing received for a while: provoke an answer if the exchange has a way."""

    def handover_complete(self, old: Connection, new: Connection) -> None:
        """`new` now carries old's symbols; data from `old` is ignored from here on."""


def _group(symbols: list[str], connection_of: Callable[[str], Connection | None]) -> dict[Connection, list[str]]:
    grouped: dict[Connection, list[str]] = {}
    for symbol in symbols:
        connection = connection_of(symbol)
        if connection is not None:
            grouped.setdefault(connection, []).append(symbol)
    return grouped


def _with_successor(connection: Connection) -> list[Connection]:
    return [connection] if connection.successor is None else [connection, connection.successor]
