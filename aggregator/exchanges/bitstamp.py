"""Bitstamp: `order_book_<pair>` channel (full top 100 on every change),
seeded and periodically verified by REST snapshots, ordered by microtimestamp.

Why not `diff_order_book_`: Bitstamp diffs carry no sequence number and no
checksum, so a lost diff can never be detected and the book would drift
silently. Every `order_book_` message is the whole top 100 — far deeper than
the top 10 we serve — so each one proves the book afresh. The channel sends
nothing until the book next changes (quiet pairs stay silent for 30 s and
more), hence the REST snapshot once the subscription is acknowledged; and
since a channel that silently stopped would look exactly like a quiet pair,
each book is also compared with a fresh REST snapshot every few minutes.
Facts: PROTOCOLS.md §2.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import InvalidLevel, parse_levels
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.feed import ExchangeFeed

CHANNEL_PREFIX = "order_book_"
# Levels compared per side when verifying against REST (the channel's depth).
VERIFY_DEPTH = 100


class BitstampFeed(ExchangeFeed):
    name = "bitstamp"
    frames_per_second = 50.0
    auto_ping_interval = 20.0
    auto_ping_timeout = 10.0
    # Heartbeats are sent after half of this without any frame; a live
    # connection answers them, so this much silence means a dead one.
    inactivity_timeout = 30.0
    max_symbols_per_connection = 1000
    # Documented: 8000-10000 requests per 10 minutes per client.
    rest_weight_per_minute = 400.0
    # Each watched book is checked against REST about this often.
    verify_interval = 300.0

    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per pair: microtimestamp of the levels the book holds (0 = none yet).
        self.book_time: dict[str, int] = {}
        self._snapshot_requests: dict[str, Any] = {}
        self._awaiting_seed: dict[str, Connection] = {}  # subscribed, not yet acknowledged
        self._verified_at: dict[str, float] = {}
        self._verifier: LoopingCall | None = None
        self._crossed: set[str] = set()
        self.verify_mismatches = 0

    def symbol_list_path(self) -> str:
        return "/api/v2/trading-pairs-info/"

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        return [
            entry["url_symbol"].lower()
            for entry in document
            if entry.get("trading", "Enabled") == "Enabled"
        ]

    def startService(self) -> None:
        super().startService()
        self._verifier = LoopingCall(self._verify_next)
        self._verifier.clock = self.reactor
        # Ticks often, verifies at most one stale-enough book per tick: spread out.
        self._verifier.start(max(self.verify_interval / 100, 1.0), now=False)

    def stopService(self) -> Any:
        if self._verifier is not None and self._verifier.running:
            self._verifier.stop()
        self._verifier = None
        return super().stopService()

    # -- demand -------------------------------------------------------------

    def start_symbols(self, connection: Connection, symbols: list[str], handover: bool) -> None:
        for symbol in symbols:
            connection.send({"event": "bts:subscribe", "data": {"channel": CHANNEL_PREFIX + symbol}})
            if not handover:
                self.forget_symbol(symbol)
                self.book_time[symbol] = 0
                # Seeded once the subscription is acknowledged: a snapshot taken
                # earlier could miss a change made before the channel started,
                # and a quiet pair might not change again for a long time.
                self._awaiting_seed[symbol] = connection

    def stop_symbols(self, connection: Connection, symbols: list[str]) -> None:
        for symbol in symbols:
            connection.send({"event": "bts:unsubscribe", "data": {"channel": CHANNEL_PREFIX + symbol}})

    def forget_symbol(self, symbol: str) -> None:
        self.book_time.pop(symbol, None)
        self._awaiting_seed.pop(symbol, None)
        self._verified_at.pop(symbol, None)
        self._crossed.discard(symbol)
        request = self._snapshot_requests.pop(symbol, None)
        if request is not None:
            request.cancel()

    def idle_probe(self, connection: Connection) -> None:
        connection.send({"event": "bts:heartbeat"})

    # -- REST snapshots: seed and verification ------------------------------------

    def _fetch_snapshot(self, symbol: str, purpose: str) -> None:
        # The cache-buster defeats the ~1 s edge cache in front of the endpoint.
        millis = int(self.reactor.seconds() * 1000)
        request = self._snapshot_requests[symbol] = self.http.get_json(
            f"{self.rest_url}/api/v2/order_book/{symbol}/?_={millis}"
        )
        self._verified_at[symbol] = self.reactor.seconds()
        metrics.SNAPSHOT_REQUESTS.labels(self.name, purpose).inc()
        request.addCallbacks(
            self._snapshot_loaded, self._snapshot_failed,
            callbackArgs=(symbol, request, purpose), errbackArgs=(symbol, request),
        )

    def _snapshot_loaded(self, document: Any, symbol: str, request: Any, purpose: str) -> None:
        if self._snapshot_requests.get(symbol) is not request:
            return  # cancelled
        del self._snapshot_requests[symbol]
        if purpose == "verify":
            self._verify(symbol, document)
        else:
            self._book_message(symbol, document, "snapshot")

    def _snapshot_failed(self, reason: Any, symbol: str, request: Any) -> None:
        if self._snapshot_requests.get(symbol) is not request:
            return  # cancelled: the symbol was unwatched or resubscribed
        del self._snapshot_requests[symbol]
        # Not fatal: the channel's next message is a full book anyway.
        self.problems.warn(
            ("snapshot_failed", symbol),
            "bitstamp {symbol}: snapshot request failed ({error}); relying on the stream",
            symbol=symbol, error=reason.value,
        )

    def _verify_next(self) -> None:
        now = self.reactor.seconds()
        due = [
            (verified, symbol)
            for symbol, verified in self._verified_at.items()
            if now - verified >= self.verify_interval and symbol not in self._snapshot_requests
        ]
        if due:
            self._fetch_snapshot(min(due)[1], "verify")

    def _verify(self, symbol: str, document: Any) -> None:
        held = self.book_time.get(symbol)
        book = self.books.get(symbol)
        if held is None or book is None:
            return
        try:
            when = int(document["microtimestamp"])
            bids = _best_first(parse_levels(document["bids"]), reverse=True)[:VERIFY_DEPTH]
            asks = _best_first(parse_levels(document["asks"]), reverse=False)[:VERIFY_DEPTH]
        except (KeyError, TypeError, ValueError):
            return  # a bad verification snapshot proves nothing either way
        if when < held or not book.live:
            return  # the stream is ahead: nothing to compare at the same moment
        if (book.book.top_bids(len(bids)), book.book.top_asks(len(asks))) == (bids, asks):
            return
        self.verify_mismatches += 1
        metrics.RESYNCS.labels(self.name, "verify_mismatch").inc()
        self.log.warn(
            "bitstamp {symbol}: book differs from a newer REST snapshot ({age:.1f}s newer); "
            "replaced by it", symbol=symbol, age=(when - held) / 1e6,
        )
        self._book_message(symbol, document, "verification snapshot")

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any) -> None:
        if not isinstance(message, dict):
            self.reject("unexpected", "bitstamp: unexpected message {message!r}", message=message)
            return
        event = message.get("event")
        channel = message.get("channel") or ""
        if event == "data" and channel.startswith(CHANNEL_PREFIX):
            symbol = channel[len(CHANNEL_PREFIX):]
            if symbol in connection.symbols:
                self._book_message(symbol, message.get("data"), "stream")
        elif event == "bts:request_reconnect":
            self.rotate(connection, "bitstamp asked us to reconnect")
        elif event == "bts:error":
            self.reject("error_reply", "bitstamp: error reply {data!r}", data=message.get("data"))
        elif event == "bts:subscription_succeeded" and channel.startswith(CHANNEL_PREFIX):
            symbol = channel[len(CHANNEL_PREFIX):]
            if self._awaiting_seed.get(symbol) is connection:
                del self._awaiting_seed[symbol]
                self._fetch_snapshot(symbol, "snapshot")
        elif event in ("bts:unsubscription_succeeded", "bts:heartbeat"):
            pass
        else:
            self.reject("unexpected", "bitstamp: unexpected event {event!r}", event=event)

    def _book_message(self, symbol: str, data: Any, source: str) -> None:
        held = self.book_time.get(symbol)
        if held is None:
            return  # not watched (any more)
        book = self.books[symbol]
        try:
            when = int(data["microtimestamp"])
            bids = parse_levels(data["bids"])
            asks = parse_levels(data["asks"])
        except (KeyError, TypeError, ValueError) as error:
            self._reject(book, source, error)
            return
        if when <= held:
            return  # older than what the book shows (e.g. a lagging snapshot)
        try:
            book.replace(bids, asks)
        except InvalidLevel as error:
            self._reject(book, source, error)
            return
        self.book_time[symbol] = when
        book.mark_live()
        self._note_crossing(symbol, book.book.is_crossed())

    def _note_crossing(self, symbol: str, crossed: bool) -> None:
        # Bitstamp's published book does cross briefly: keep it (it is what
        # the exchange shows), count it, log it once per episode.
        if crossed and symbol not in self._crossed:
            self._crossed.add(symbol)
            metrics.CROSSED.labels(self.name).inc()
            self.log.info("bitstamp {symbol}: book is crossed (as published)", symbol=symbol)
        elif not crossed:
            self._crossed.discard(symbol)

    def _reject(self, book: Any, source: str, error: Exception) -> None:
        # The next full message heals the book; until then it is withheld.
        self.reject(
            "bad_number" if isinstance(error, InvalidLevel) else "bad_data",
            "bitstamp {symbol}: rejected {source} message: {error}",
            symbol=book.symbol, source=source, error=error,
        )
        book.mark_stale(f"rejected {source} message: {error}")


def _best_first(levels: list[tuple[float, float]], reverse: bool) -> list[tuple[float, float]]:
    return sorted((level for level in levels if level[1] > 0.0), reverse=reverse)

