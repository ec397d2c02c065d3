"""Binance spot: combined diff-depth stream + REST snapshots, synced by update id.

Protocol facts: shared/PROTOCOLS.md §1. Per symbol, the official procedure
(§1.7) as a small state machine, `DepthSync`.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.logger import Logger

from aggregator.book import InvalidLevel, parse_levels
from aggregator.exchanges.feed import ExchangeFeed
from aggregator.merger import ExchangeBook

# Keep SUBSCRIBE frames small: frames over ~4 KB have been reported to get no reply.
STREAMS_PER_REQUEST = 100
SNAPSHOT_LIMIT = 1000
# Diffs buffered while a snapshot is in flight. Past this the oldest are
# dropped, which the snapshot check then sees as a gap (→ refetch).
MAX_BUFFERED_DIFFS = 5000


def stream_name(symbol: str) -> str:
    return f"{symbol}@depth@100ms"


class DepthSync:
    """One symbol's book kept from a snapshot plus `U`/`u`-sequenced diffs.

    waiting-ack → (SUBSCRIBE acknowledged) → fetching → (snapshot bridges the
    buffered diffs) → live; any gap, bad number or failed bridge → fetching
    again, with the book withheld from the merge meanwhile.
    """

    log = Logger()

    def __init__(self, feed: BinanceFeed, book: ExchangeBook) -> None:
        self.feed = feed
        self.book = book
        self.symbol = book.symbol
        self.state = "waiting-ack"
        self.last_update_id: int | None = None
        self.buffer: list[dict[str, Any]] = []
        self.attempts = 0
        self.request: Any = None
        self.retry: Any = None

    # -- events ---------------------------------------------------------------

    def subscribed(self) -> None:
        if self.state == "waiting-ack":
            self.fetch_snapshot()

    def diff(self, event: dict[str, Any]) -> None:
        first, last = event.get("U"), event.get("u")
        if type(first) is not int or type(last) is not int or first > last:
            self.resync(f"malformed update ids U={first!r} u={last!r}")
            return
        if self.state != "live":
            self.buffer.append(event)
            if len(self.buffer) > MAX_BUFFERED_DIFFS:
                del self.buffer[0]
            return
        self.apply(event)

    def snapshot(self, document: dict[str, Any]) -> None:
        self.request = None
        try:
            last_update_id = int(document["lastUpdateId"])
            bids = parse_levels(document["bids"])
            asks = parse_levels(document["asks"])
        except (KeyError, TypeError, ValueError) as error:
            self.resync(f"bad snapshot: {error}")
            return
        buffered = [e for e in self.buffer if e["u"] > last_update_id]
        self.buffer = []
        if buffered and buffered[0]["U"] > last_update_id + 1:
            self.resync(
                f"snapshot {last_update_id} older than the stream ({buffered[0]['U']})"
            )
            return
        try:
            self.book.replace(bids, asks)
        except InvalidLevel as error:
            self.resync(f"bad snapshot: {error}")
            return
        self.state = "live"
        self.attempts = 0
        self.last_update_id = last_update_id
        for event in buffered:
            if not self.apply(event):
                return

    def apply(self, event: dict[str, Any]) -> bool:
        """Apply an in-sequence diff; False if it forced a resync."""
        first, last = event["U"], event["u"]
        previous = self.last_update_id
        if last <= previous:
            return True  # already contained in the book (snapshot or replay)
        if first > previous + 1:
            self.resync(f"gap: expected update {previous + 1}, got {first}-{last}")
            return False
        try:
            self.book.apply(parse_levels(event.get("b")), parse_levels(event.get("a")))
        except InvalidLevel as error:
            self.resync(f"rejected update {first}-{last}: {error}")
            return False
        self.last_update_id = last
        return True

    # -- snapshot fetching ------------------------------------------------------

    def resync(self, reason: str) -> None:
        self.log.warn(
            "binance {symbol}: resync ({reason})", symbol=self.symbol, reason=reason
        )
        self.book.mark_stale(reason)
        self.state = "fetching"
        self.last_update_id = None
        self.cancel()
        delay = self.feed.retry_policy(self.attempts) if self.attempts else 0.0
        self.attempts += 1
        self.retry = self.feed.reactor.callLater(delay, self.fetch_snapshot)

    def fetch_snapshot(self) -> None:
        self.retry = None
        self.state = "fetching"
        request = self.request = self.feed.http.get_json(
            f"{self.feed.rest_url}/api/v3/depth?symbol={self.symbol.upper()}"
            f"&limit={SNAPSHOT_LIMIT}"
        )
        request.addCallbacks(
            self._snapshot_answered, self._snapshot_failed,
            callbackArgs=(request,), errbackArgs=(request,),
        )

    def _snapshot_answered(self, document: dict[str, Any], request: Any) -> None:
        if request is self.request:  # else cancelled or superseded
            self.snapshot(document)

    def _snapshot_failed(self, reason: Any, request: Any) -> None:
        if request is self.request:
            self.request = None
            self.resync(f"snapshot request failed: {reason.value}")

    def cancel(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.cancel()
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None


class BinanceFeed(ExchangeFeed):
    name = "binance"
    # 5 frames/s per connection, pings and pongs included: keep well under.
    frames_per_second = 4.0
    # The server pings every 20 s; our own pings also count against the budget.
    auto_ping_interval = 30.0
    auto_ping_timeout = 20.0

    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.syncs: dict[str, DepthSync] = {}
        self._requests: dict[int, tuple[str, list[str]]] = {}
        self._next_request_id = 1

    def connection_url(self) -> str:
        return self.ws_url.rstrip("/") + "/stream"

    def symbol_list_path(self) -> str:
        return "/api/v3/exchangeInfo"

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        return (
            entry["symbol"].lower()
            for entry in document["symbols"]
            if entry.get("status") == "TRADING"
        )

    # -- demand ---------------------------------------------------------------

    def start_symbols(self, symbols: list[str]) -> None:
        for symbol in symbols:
            self.forget_symbol(symbol)
            self.syncs[symbol] = DepthSync(self, self.books[symbol])
        self._request("SUBSCRIBE", symbols)

    def stop_symbols(self, symbols: list[str]) -> None:
        self._request("UNSUBSCRIBE", symbols)

    def forget_symbol(self, symbol: str) -> None:
        sync = self.syncs.pop(symbol, None)
        if sync is not None:
            sync.cancel()

    def connection_closed(self, protocol: Any, reason: str) -> None:
        self._requests.clear()
        super().connection_closed(protocol, reason)

    def _request(self, method: str, symbols: list[str]) -> None:
        for start in range(0, len(symbols), STREAMS_PER_REQUEST):
            batch = symbols[start : start + STREAMS_PER_REQUEST]
            request_id = self._next_request_id
            self._next_request_id += 1
            self._requests[request_id] = (method, batch)
            self.send(
                {"method": method, "params": [stream_name(s) for s in batch], "id": request_id}
            )

    # -- messages ---------------------------------------------------------------

    def handle(self, message: Any) -> None:
        data = message.get("data") if isinstance(message, dict) else None
        if data is not None:
            if data.get("e") == "depthUpdate":
                sync = self.syncs.get(message["stream"].partition("@")[0])
                if sync is not None:
                    sync.diff(data)
            elif data.get("e") == "serverShutdown":
                self.reconnect("server shutdown announced")
            return
        if isinstance(message, dict) and "id" in message:
            self._reply(message)
            return
        self.log.warn("binance: unexpected message {message!r}", message=message)

    def _reply(self, message: dict[str, Any]) -> None:
        method, symbols = self._requests.pop(message["id"], (None, []))
        error = message.get("error")
        if error is not None:
            self.log.error(
                "binance: {method} {symbols} refused: {error}",
                method=method, symbols=symbols, error=error,
            )
            for symbol in symbols:
                if symbol in self.books:
                    self.books[symbol].mark_stale(f"{method} refused: {error}")
            return
        if method == "SUBSCRIBE":
            for symbol in symbols:
                sync = self.syncs.get(symbol)
                if sync is not None:
                    sync.subscribed()
