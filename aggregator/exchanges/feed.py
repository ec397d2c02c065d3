"""What every exchange feed shares: the symbol list, demand, the connection,
paced sending. The exchange modules add their wire format and sync rules.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, ClassVar, Iterable

import orjson
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from aggregator.exchanges.websocket import FeedProtocol, websocket_client_service
from aggregator.http import JsonHttp
from aggregator.merger import ExchangeBook


class ExchangeFeed(Service):
    """One exchange: one websocket connection carrying every watched symbol.

    Subclasses implement the hooks at the bottom; everything about connection
    life, demand bookkeeping and outbound pacing lives here.
    """

    name: ClassVar[str]
    # Outbound frame budget; Binance disconnects (then bans) above 5/s, and
    # counts pongs too, so subclasses set this below the exchange's limit.
    frames_per_second: ClassVar[float] = 10.0
    auto_ping_interval: ClassVar[float] = 30.0
    auto_ping_timeout: ClassVar[float] = 10.0

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
        self.http = http if http is not None else JsonHttp(reactor)
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=30.0, jitter=random.random
        )
        self.books: dict[str, ExchangeBook] = {}
        self.protocol: FeedProtocol | None = None
        self._listed: frozenset[str] | None = None
        self._listed_waiters: list[Deferred] = []
        self._list_attempts = 0
        self._list_request: Deferred | None = None
        self._list_retry: Any = None
        self._connection: ClientService | None = None
        self._connection_listeners: list[Callable[[str, bool], None]] = []
        self._to_start: dict[str, None] = {}  # ordered sets
        self._to_stop: dict[str, None] = {}
        self._demand_flush: Any = None
        self._outbox: deque[bytes] = deque()
        self._send_timer: Any = None
        self._next_send_at = 0.0

    # -- what the merger (and health reporting) use ------------------------------

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """listener(exchange name, connected) on every connect and disconnect."""
        self._connection_listeners.append(listener)

    def _tell_connection_listeners(self) -> None:
        for listener in self._connection_listeners:
            listener(self.name, self.connected)

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
        if self._to_start.pop(symbol, 1) is not None:  # already subscribed
            self._to_stop[symbol] = None
            self._schedule_demand_flush()

    def _schedule_demand_flush(self) -> None:
        # Demand changes made in one reactor turn (a client asking for many
        # symbols, a burst of disconnects) leave as one batch of frames.
        if self._demand_flush is None:
            self._demand_flush = self.reactor.callLater(0, self._flush_demand)

    def _flush_demand(self) -> None:
        self._demand_flush = None
        to_stop, self._to_stop = list(self._to_stop), {}
        to_start, self._to_start = list(self._to_start), {}
        if self.protocol is None:
            return  # connection_opened subscribes everything watched
        if to_stop:
            self.stop_symbols(to_stop)
        if to_start:
            self.start_symbols(to_start)

    # -- life cycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._load_symbol_list()
        self._connection = websocket_client_service(
            self.reactor,
            self.connection_url(),
            self,
            self.retry_policy,
            self.auto_ping_interval,
            self.auto_ping_timeout,
        )
        self._connection.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        for timer in (self._list_retry, self._send_timer, self._demand_flush):
            if timer is not None and timer.active():
                timer.cancel()
        self._list_retry = self._send_timer = self._demand_flush = None
        if self._list_request is not None:
            self._list_request.cancel()
        for symbol in list(self.books):
            self.forget_symbol(symbol)
        self._outbox.clear()
        stopped = self._connection.stopService() if self._connection else succeed(None)
        return stopped.addBoth(lambda _: self.http.close())

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

    # -- the connection (called by FeedProtocol) --------------------------------------

    def connection_opened(self, protocol: FeedProtocol) -> None:
        self.protocol = protocol
        self._next_send_at = 0.0
        self.log.info("{feed}: connected to {url}", feed=self.name, url=self.connection_url())
        self._to_start.clear()
        self._to_stop.clear()
        for book in self.books.values():
            book.mark_syncing("connected, resubscribing")
        if self.books:
            self.start_symbols(list(self.books))
        self._tell_connection_listeners()

    def connection_closed(self, protocol: FeedProtocol, reason: str) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self._outbox.clear()
        if self._send_timer is not None and self._send_timer.active():
            self._send_timer.cancel()
        self._send_timer = None
        if self.running:
            self.log.warn("{feed}: disconnected ({reason})", feed=self.name, reason=reason)
        for symbol, book in self.books.items():
            self.forget_symbol(symbol)
            book.mark_stale(f"disconnected: {reason}")
        self._tell_connection_listeners()

    def message_received(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            self.log.warn("{feed}: malformed JSON dropped ({error})", feed=self.name, error=error)
            return
        try:
            self.handle(message)
        except Exception:
            self.log.failure("{feed}: cannot handle {message!r}", feed=self.name, message=payload[:200])

    def reconnect(self, reason: str) -> None:
        """Drop the connection; ClientService opens a new one."""
        if self.protocol is not None:
            self.log.info("{feed}: reconnecting ({reason})", feed=self.name, reason=reason)
            self.protocol.dropConnection(abort=False)

    # -- sending, paced ---------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue a JSON frame; frames leave at most frames_per_second."""
        if self.protocol is None:
            return
        self._outbox.append(orjson.dumps(message))
        if self._send_timer is None:
            self._drain()

    def _drain(self) -> None:
        self._send_timer = None
        interval = 1.0 / self.frames_per_second
        while self._outbox and self.protocol is not None:
            now = self.reactor.seconds()
            if now < self._next_send_at:
                self._send_timer = self.reactor.callLater(self._next_send_at - now, self._drain)
                return
            self.protocol.sendMessage(self._outbox.popleft(), isBinary=False)
            self._next_send_at = max(now, self._next_send_at) + interval

    # -- hooks for the exchange modules ------------------------------------------

    def connection_url(self) -> str:
        return self.ws_url

    def symbol_list_path(self) -> str:
        raise NotImplementedError

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        """The exchange's instrument list → canonical symbols with live books."""
        raise NotImplementedError

    def start_symbols(self, symbols: list[str]) -> None:
        """Subscribe on the open connection and start syncing these books."""
        raise NotImplementedError

    def stop_symbols(self, symbols: list[str]) -> None:
        """Unsubscribe on the open connection."""
        raise NotImplementedError

    def forget_symbol(self, symbol: str) -> None:
        """Drop per-symbol sync state, cancelling its timers and requests."""
        raise NotImplementedError

    def handle(self, message: Any) -> None:
        """One decoded frame."""
        raise NotImplementedError
