"""Test doubles shared by the unit tests."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed


class FakeFeed:
    """A Feed as the merger sees it, recording watch/unwatch."""

    def __init__(self, name: str, symbols=None) -> None:
        self.name = name
        self._symbols = None if symbols is None else frozenset(symbols)
        self._waiters: list[Deferred] = []
        self.books = {}
        self.watched: list[str] = []
        self.unwatched: list[str] = []

    def listed_symbols(self):
        return self._symbols

    def instrument(self, symbol):
        from aggregator.instruments import Instrument

        markets = getattr(self, "markets", {})
        base, quote = markets.get(symbol, (symbol[:3].upper(), symbol[3:].upper()))
        return Instrument(symbol.upper(), base, quote)

    def when_symbols_loaded(self) -> Deferred:
        if self._symbols is not None:
            return succeed(None)
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    def load(self, symbols) -> None:
        self._symbols = frozenset(symbols)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def watch(self, book) -> None:
        self.books[book.symbol] = book
        self.watched.append(book.symbol)

    def unwatch(self, symbol: str) -> None:
        del self.books[symbol]
        self.unwatched.append(symbol)


class FakeHttp:
    """JsonHttp double: each GET returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Deferred]] = []
        self.weights: list[tuple[str, float]] = []

    def get_json(self, url: str, weight: float = 1.0) -> Deferred:
        self.weights.append((url, weight))
        # Like treq, cancelling fails the request with a wrapped error, not
        # necessarily CancelledError itself.
        d = Deferred(lambda d: d.errback(RuntimeError(f"request to {url} cancelled")))
        self.requests.append((url, d))
        return d

    def pending(self, prefix: str = "") -> list[tuple[str, Deferred]]:
        return [(u, d) for u, d in self.requests if u.startswith(prefix) and not d.called]

    def answer(self, prefix: str, document) -> None:
        """Fire the oldest pending request whose URL starts with prefix."""
        url, d = self.pending(prefix)[0]
        d.callback(document)

    def fail(self, prefix: str, error: Exception) -> None:
        url, d = self.pending(prefix)[0]
        d.errback(error)

    def close(self) -> Deferred:
        return succeed(None)


class FakeProtocol:
    """What a feed sees of its websocket connection."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.dropped = False

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        assert not isBinary
        self.sent.append(payload)

    def dropConnection(self, abort: bool = False) -> None:
        self.dropped = True

    def frames(self) -> list:
        import orjson

        return [orjson.loads(p) for p in self.sent]


def publish(book, bids, asks) -> None:
    """What a feed does with a verified snapshot: set the levels, vouch for them."""
    book.book.replace(bids, asks)
    book.go_live()


class FakeConnector:
    """Connector double: records the connections it was asked to connect;
    the test opens them by hand (connection.connection_opened(FakeProtocol()))."""

    def __init__(self) -> None:
        self.started: list = []
        self.stopped: list = []

    def __call__(self, connection):
        connector = self

        class Service:
            def startService(self) -> None:
                connector.started.append(connection)

            def stopService(self) -> Deferred:
                connector.stopped.append(connection)
                return succeed(None)

        return Service()


def listing(venue: str, symbols) -> object:
    """The venue's symbol-list document listing `symbols` (base: the first three letters)."""
    split = [(s.upper()[:3], s.upper()[3:]) for s in symbols]
    if venue == "binance":
        return {"symbols": [{"symbol": b + q, "status": "TRADING", "baseAsset": b, "quoteAsset": q}
                            for b, q in split]}
    if venue == "bitstamp":
        return [{"url_symbol": (b + q).lower(), "name": f"{b}/{q}", "trading": "Enabled"}
                for b, q in split]
    raise ValueError(venue)


def load_listing(feed, http, symbols) -> None:
    """Answer the feed's pending symbol-list request."""
    http.answer(feed.symbol_list.url, listing(feed.name, symbols))


class FeedHarness:
    """A started feed whose first connection is opened by hand: no sockets,
    time on a Clock."""

    REST = "http://rest.test"

    def __init__(self, adapter, symbols=("ethbtc",), start_time: float = 0.0, settings=None,
                 listed=(), document=None):
        """`document`: the venue's symbol-list reply (default: listing())."""
        from twisted.internet.task import Clock

        from aggregator.book import ExchangeBook
        from aggregator.exchanges.feed import VenueFeed

        self.clock = Clock()
        self.clock.advance(start_time)
        self.http = FakeHttp()
        self.connector = FakeConnector()
        self.feed = VenueFeed(adapter, "ws://ws.test", self.REST, reactor=self.clock,
                              http=self.http, connector=self.connector, settings=settings)
        self.changes: list = []
        self.arrivals: list = []
        self.books = {}
        for symbol in symbols:
            self.books[symbol] = ExchangeBook(self.feed.name, symbol, self._changed)
            self.feed.watch(self.books[symbol])
        self.feed.startService()
        if document is None:
            load_listing(self.feed, self.http, [*symbols, *listed])
        else:
            self.http.answer(self.feed.symbol_list.url, document)
        self.connection = self.feed.connections[0]
        self.protocol = FakeProtocol()
        self.connection.connection_opened(self.protocol)
        self.clock.advance(0)

    def _changed(self, book, arrival) -> None:
        self.changes.append(book)
        self.arrivals.append(arrival)

    def receive(self, payload: bytes) -> None:
        self.connection.message_received(payload)

    def stop(self) -> None:
        self.feed.stopService()
