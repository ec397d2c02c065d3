"""Binance spot: combined diff-depth stream + REST snapshots, synced by update id.

Protocol facts: shared/PROTOCOLS.md §1. Per symbol, the official procedure
(§1.7) as a small state machine, `DepthSync`.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import InvalidLevel, parse_levels
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.feed import ExchangeFeed
from aggregator.merger import ExchangeBook

# Keep SUBSCRIBE frames small: frames over ~4 KB have been reported to get no reply.
STREAMS_PER_REQUEST = 100
# 100 levels a side is ten times the depth served and costs weight 5 (1000
# would cost 50): ten times more resyncs per minute within the IP's budget.
# Should the book ever thin out below the served depth inside the snapshot's
# horizon, the sync notices (OrderBook.thinner_than) and fetches a new one.
SNAPSHOT_LIMIT = 100
SNAPSHOT_WEIGHT = 5
EXCHANGE_INFO_WEIGHT = 20
# Of the IP's published request-weight budget, what we allow ourselves: the
# rest is headroom for anything else on the same address.
REST_BUDGET_SHARE = 0.5
# Diffs buffered while a snapshot is in flight (or a handover is under way).
# Past this the oldest are dropped, which the bridging check then sees as a
# gap (→ refetch): bounded memory, never a silently lost diff.
MAX_BUFFERED_DIFFS = 5000


def stream_name(symbol: str) -> str:
    return f"{symbol}@depth@100ms"


def by_last_id(event: dict[str, Any]) -> int:
    return event["u"]


class DepthSync:
    """One symbol's book kept from a snapshot plus `U`/`u`-sequenced diffs.

    waiting-ack → (SUBSCRIBE acknowledged) → fetching → (snapshot bridges the
    buffered diffs) → live; any gap, bad number or failed bridge → fetching
    again, with the book withheld from the merge meanwhile.

    The rule for every diff is `U <= last+1 <= u` (diffs carry absolute sizes,
    so an overlapping diff is still exact); `u <= last` is a duplicate. That
    also lets two connections carry the same stream during a handover.
    """

    log = Logger()

    def __init__(self, feed: BinanceFeed, book: ExchangeBook, connection: Connection) -> None:
        self.feed = feed
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.state = "waiting-ack"
        self.last_update_id: int | None = None
        # The highest update id seen on the stream: a snapshot older than
        # this would roll the book back.
        self.newest_id = 0
        self.buffer: list[dict[str, Any]] = []
        # Diffs from a successor connection that ran ahead of this one.
        self.successor_buffer: list[dict[str, Any]] = []
        self.attempts = 0
        self.request: Any = None
        self.retry: Any = None

    # -- events ---------------------------------------------------------------

    def subscribed(self) -> None:
        if self.state == "waiting-ack":
            self.fetch_snapshot()

    def diff(self, event: dict[str, Any], from_successor: bool = False) -> None:
        first, last = event.get("U"), event.get("u")
        if type(first) is not int or type(last) is not int or first > last:
            self.feed.reject("bad_ids", "binance {symbol}: malformed update ids U={first!r} u={last!r}",
                             symbol=self.symbol, first=first, last=last)
            self.resync("malformed update ids", "bad_data")
            return
        if last > self.newest_id:
            self.newest_id = last
        if self.state != "live":
            _append_bounded(self.buffer, event)
        elif from_successor and first > self.last_update_id + 1:
            _append_bounded(self.successor_buffer, event)  # the old connection lags
        else:
            self.apply(event)

    def snapshot(self, document: dict[str, Any]) -> None:
        try:
            last_update_id = int(document["lastUpdateId"])
            bids = parse_levels(document["bids"])
            asks = parse_levels(document["asks"])
            self.book.replace(bids, asks, truncated_at=SNAPSHOT_LIMIT)
        except (KeyError, TypeError, ValueError) as error:  # InvalidLevel is a ValueError
            self.feed.reject("bad_snapshot", "binance {symbol}: bad snapshot ({error})",
                             symbol=self.symbol, error=error)
            self.resync(f"bad snapshot: {error}", "bad_data")
            return
        # Kept for the next snapshot if this one is too old: they are newer.
        buffered = self.buffer = sorted(
            (e for e in self.buffer if e["u"] > last_update_id), key=by_last_id
        )
        if buffered:
            stale = buffered[0]["U"] > last_update_id + 1  # a gap between snapshot and stream
        else:
            stale = self.newest_id > last_update_id  # older than what the book already showed
        if stale:
            self.resync(
                f"snapshot {last_update_id} older than the stream ({self.newest_id})",
                "stale_snapshot",
            )
            return
        self.buffer = []
        self.state = "live"
        self.attempts = 0
        self.last_update_id = last_update_id
        for event in buffered:
            if not self.apply(event):
                return
        self.book.mark_live()  # once caught up: one Summary, not one per buffered diff

    def apply(self, event: dict[str, Any]) -> bool:
        """Apply an in-sequence diff; False if it forced a resync."""
        first, last = event["U"], event["u"]
        previous = self.last_update_id
        if last <= previous:
            return True  # already contained in the book
        if first > previous + 1:
            self.resync(f"gap: expected update {previous + 1}, got {first}-{last}", "gap")
            self.buffer.append(event)  # valid and newer: the next snapshot must bridge to it
            return False
        try:
            self.book.apply(parse_levels(event.get("b")), parse_levels(event.get("a")))
        except InvalidLevel as error:
            self.feed.reject("bad_number", "binance {symbol}: rejected update {first}-{last}: {error}",
                             symbol=self.symbol, first=first, last=last, error=error)
            self.resync(f"rejected update {first}-{last}: {error}", "bad_data")
            return False
        self.last_update_id = last
        book = self.book.book
        if book.thinner_than(self.book.depth):
            self.resync("book thinned out beyond the snapshot's depth", "depth_exhausted")
            return False
        if book.is_crossed():
            # Binance's own book never crosses (it matches): ours is out of sync.
            metrics.CROSSED.labels("binance").inc()
            self.resync("book crossed: our copy is out of sync", "crossed")
            return False
        return True

    def adopt_successor(self, connection: Connection) -> None:
        """Handover done: `connection` is ours now; catch up with what it ran ahead with."""
        self.connection = connection
        pending, self.successor_buffer = sorted(self.successor_buffer, key=by_last_id), []
        if self.state == "live":
            for event in pending:
                if not self.apply(event):
                    return

    # -- snapshot fetching ------------------------------------------------------

    def resync(self, reason: str, cause: str) -> None:
        self.log.warn("binance {symbol}: resync ({reason})", symbol=self.symbol, reason=reason)
        metrics.RESYNCS.labels("binance", cause).inc()
        self.book.mark_stale(reason)
        self.state = "fetching"
        self.last_update_id = None
        self.successor_buffer = []
        self._cancel_pending()
        delay = self.feed.retry_policy(self.attempts) if self.attempts else 0.0
        self.attempts += 1
        self.retry = self.feed.reactor.callLater(delay, self.fetch_snapshot)

    def fetch_snapshot(self) -> None:
        self.retry = None
        self.state = "fetching"
        metrics.SNAPSHOT_REQUESTS.labels("binance", "snapshot").inc()
        request = self.request = self.feed.http.get_json(
            f"{self.feed.rest_url}/api/v3/depth?symbol={self.symbol.upper()}"
            f"&limit={SNAPSHOT_LIMIT}",
            weight=SNAPSHOT_WEIGHT,
        )
        request.addCallbacks(
            self._snapshot_answered, self._snapshot_failed,
            callbackArgs=(request,), errbackArgs=(request,),
        )

    def _snapshot_answered(self, document: dict[str, Any], request: Any) -> None:
        if request is self.request:  # else cancelled or superseded
            self.request = None
            self.snapshot(document)

    def _snapshot_failed(self, reason: Any, request: Any) -> None:
        if request is self.request:
            self.request = None
            self.resync(f"snapshot request failed: {reason.value}", "snapshot_failed")

    def _cancel_pending(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.cancel()
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None

    def cancel(self) -> None:
        """The symbol is no longer synced here (unwatched, or its connection died)."""
        self._cancel_pending()
        self.buffer = []
        self.successor_buffer = []


def _append_bounded(buffer: list[dict[str, Any]], event: dict[str, Any]) -> None:
    buffer.append(event)
    if len(buffer) > MAX_BUFFERED_DIFFS:
        del buffer[0]


class BinanceFeed(ExchangeFeed):
    name = "binance"
    # Binance allows 5 frames/s per connection, pings and pongs included. At
    # most 3 JSON frames leave per second: with one pong (server pings every
    # 20 s) and one ping of ours (every 30 s) landing in the same second, 5.
    frames_per_second = 3.0
    auto_ping_interval = 30.0
    auto_ping_timeout = 20.0
    # The server pings every 20 s: a minute of silence means a dead socket.
    inactivity_timeout = 60.0
    # Binance closes connections after 24 h: replace them before that.
    max_connection_age = 23.5 * 3600
    # Binance's cap is 1024 streams per connection.
    max_symbols_per_connection = 1000
    # Until exchangeInfo says otherwise (it publishes the IP's weight budget).
    rest_weight_per_minute = 1200 * REST_BUDGET_SHARE

    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.syncs: dict[str, DepthSync] = {}

    def connection_url(self) -> str:
        return self.ws_url.rstrip("/") + "/stream"

    def symbol_list_path(self) -> str:
        return "/api/v3/exchangeInfo"

    def parse_symbol_list(self, document: Any) -> Iterable[str]:
        for limit in document.get("rateLimits", ()):
            if limit.get("rateLimitType") == "REQUEST_WEIGHT" and limit.get("interval") == "MINUTE":
                per_minute = limit["limit"] / max(int(limit.get("intervalNum", 1)), 1)
                self.http.limiter.set_budget(per_minute * REST_BUDGET_SHARE)
        return [
            entry["symbol"].lower()
            for entry in document["symbols"]
            if entry.get("status") == "TRADING"
        ]

    # -- demand ---------------------------------------------------------------

    def start_symbols(self, connection: Connection, symbols: list[str], handover: bool) -> None:
        if not handover:
            for symbol in symbols:
                self.forget_symbol(symbol)
                self.syncs[symbol] = DepthSync(self, self.books[symbol], connection)
        self._request(connection, "SUBSCRIBE", symbols)

    def stop_symbols(self, connection: Connection, symbols: list[str]) -> None:
        self._request(connection, "UNSUBSCRIBE", symbols)

    def forget_symbol(self, symbol: str) -> None:
        sync = self.syncs.pop(symbol, None)
        if sync is not None:
            sync.cancel()

    def handover_complete(self, old: Connection, new: Connection) -> None:
        for sync in self.syncs.values():
            if sync.connection is old:
                sync.adopt_successor(new)

    def _request(self, connection: Connection, method: str, symbols: list[str]) -> None:
        for start in range(0, len(symbols), STREAMS_PER_REQUEST):
            batch = symbols[start : start + STREAMS_PER_REQUEST]
            request_id = connection.next_request_id()
            connection.requests[request_id] = (method, batch)
            connection.send(
                {"method": method, "params": [stream_name(s) for s in batch], "id": request_id}
            )

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any) -> None:
        if not isinstance(message, dict):
            self.reject("unexpected", "binance: unexpected message {message!r}", message=message)
            return
        data = message.get("data")
        if isinstance(data, dict):
            event = data.get("e")
            if event == "depthUpdate":
                self._depth_update(connection, str(message.get("stream")), data)
            elif event == "serverShutdown":
                self.rotate(connection, "server shutdown announced")
            return
        if "id" in message:
            self._reply(connection, message)
            return
        self.reject("unexpected", "binance: unexpected message {message!r}", message=message)

    def _depth_update(self, connection: Connection, stream: str, data: dict[str, Any]) -> None:
        sync = self.syncs.get(stream.partition("@")[0])
        if sync is None:
            return  # not (or no longer) watched
        if connection is sync.connection:
            sync.diff(data)
        elif connection.replaces is sync.connection:
            sync.diff(data, from_successor=True)

    def _reply(self, connection: Connection, message: dict[str, Any]) -> None:
        method, symbols = connection.requests.pop(message["id"], (None, []))
        error = message.get("error")
        if error is not None:
            self.reject("error_reply", "binance: {method} {symbols} refused: {error}",
                        method=method, symbols=symbols, error=error)
            for symbol in symbols:
                if symbol in self.books and method == "SUBSCRIBE":
                    self.books[symbol].mark_stale(f"{method} refused: {error}")
            return
        if method == "SUBSCRIBE":
            for symbol in symbols:
                sync = self.syncs.get(symbol)
                if sync is not None and sync.connection is connection:
                    sync.subscribed()
