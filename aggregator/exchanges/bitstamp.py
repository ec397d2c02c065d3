"""Bitstamp: `order_book_<pair>` channel (full top 100 on every change),
seeded by a REST snapshot, ordered by microtimestamp.

Why not `diff_order_book_`: Bitstamp diffs carry no sequence number and no
checksum, so a lost diff can never be detected and the book would drift
silently. Every `order_book_` message is the whole top 100 — far deeper than
the top 10 we serve — so each one proves the book afresh. The channel sends
nothing until the book next changes (quiet pairs stay silent for 30 s and
more), hence the one REST snapshot at subscribe time. Facts: PROTOCOLS.md §2.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.logger import Logger

from aggregator.book import InvalidLevel, parse_levels
from aggregator.exchanges.feed import ExchangeFeed

CHANNEL_PREFIX = "order_book_"


class BitstampFeed(ExchangeFeed):
    name = "bitstamp"
    frames_per_second = 50.0
    auto_ping_interval = 20.0
    auto_ping_timeout = 10.0

    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per pair: microtimestamp of the levels the book holds (0 = none yet).
        self.book_time: dict[str, int] = {}
        self._seed_requests: dict[str, Any] = {}

    def symbol_list_path(self) -> str:
        return "/api/v2/trading-pairs-info/"

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        return (
            entry["url_symbol"].lower()
            for entry in document
            if entry.get("trading", "Enabled") == "Enabled"
        )

    # -- demand -------------------------------------------------------------

    def start_symbols(self, symbols: list[str]) -> None:
        for symbol in symbols:
            self.forget_symbol(symbol)
            self.book_time[symbol] = 0
            self.send({"event": "bts:subscribe", "data": {"channel": CHANNEL_PREFIX + symbol}})
            self._fetch_seed(symbol)

    def stop_symbols(self, symbols: list[str]) -> None:
        for symbol in symbols:
            self.send({"event": "bts:unsubscribe", "data": {"channel": CHANNEL_PREFIX + symbol}})

    def forget_symbol(self, symbol: str) -> None:
        self.book_time.pop(symbol, None)
        request = self._seed_requests.pop(symbol, None)
        if request is not None:
            request.cancel()

    def _fetch_seed(self, symbol: str) -> None:
        # The cache-buster defeats the ~1 s edge cache in front of the endpoint.
        millis = int(self.reactor.seconds() * 1000)
        request = self._seed_requests[symbol] = self.http.get_json(
            f"{self.rest_url}/api/v2/order_book/{symbol}/?_={millis}"
        )
        request.addCallbacks(
            self._seed_loaded, self._seed_failed,
            callbackArgs=(symbol, request), errbackArgs=(symbol, request),
        )

    def _seed_loaded(self, document: Any, symbol: str, request: Any) -> None:
        if self._seed_requests.get(symbol) is request:  # else cancelled
            del self._seed_requests[symbol]
            self._book_message(symbol, document, "snapshot")

    def _seed_failed(self, reason: Any, symbol: str, request: Any) -> None:
        if self._seed_requests.get(symbol) is not request:
            return  # cancelled: the symbol was unwatched or resubscribed
        del self._seed_requests[symbol]
        # Not fatal: the channel's next message is a full book anyway.
        self.log.warn(
            "bitstamp {symbol}: snapshot request failed ({error}); waiting for the stream",
            symbol=symbol, error=reason.value,
        )

    # -- messages ---------------------------------------------------------------

    def handle(self, message: Any) -> None:
        if not isinstance(message, dict):
            self.log.warn("bitstamp: unexpected message {message!r}", message=message)
            return
        event = message.get("event")
        channel = message.get("channel") or ""
        if event == "data" and channel.startswith(CHANNEL_PREFIX):
            self._book_message(channel[len(CHANNEL_PREFIX):], message.get("data"), "stream")
        elif event == "bts:request_reconnect":
            self.reconnect("bitstamp asked us to reconnect")
        elif event == "bts:error":
            self.log.error("bitstamp: error reply {data!r}", data=message.get("data"))
        elif event in ("bts:subscription_succeeded", "bts:unsubscription_succeeded", "bts:heartbeat"):
            pass
        else:
            self.log.warn("bitstamp: unexpected event {event!r}", event=event)

    def _book_message(self, symbol: str, data: Any, source: str) -> None:
        held = self.book_time.get(symbol)
        if held is None:
            return  # not watched (any more)
        book = self.books[symbol]
        try:
            when = int(data["microtimestamp"])
            bids = parse_levels(data["bids"])
            asks = parse_levels(data["asks"])
        except (KeyError, TypeError, ValueError, InvalidLevel) as error:
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
        if book.book.is_crossed():
            self.log.info("bitstamp {symbol}: book is crossed (as published)", symbol=symbol)

    def _reject(self, book: Any, source: str, error: Exception) -> None:
        # The next full message heals the book; until then it is withheld.
        self.log.warn(
            "bitstamp {symbol}: rejected {source} message: {error}",
            symbol=book.symbol, source=source, error=error,
        )
        book.mark_stale(f"rejected {source} message: {error}")
