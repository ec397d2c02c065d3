"""Binance spot: combined diff-depth stream + REST snapshots, synced by update id.

Protocol facts: docs/PROTOCOLS.md §1. Per symbol, the official procedure
(§1.7) as an explicit state machine, `DepthSync`.
"""

from __future__ import annotations

import enum
from typing import Any, Iterable

import orjson
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from aggregator import metrics
from aggregator.book import BookState, ExchangeBook, InvalidLevel, parse_levels
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.venue import FeedContext, PendingReplies, VenueSettings
from aggregator.instruments import Instrument, canonical_asset

SETTINGS = VenueSettings(
    # Binance allows 5 frames/s per connection, pings and pongs included. At
    # most 3 JSON frames leave per second: with one pong (server pings every
    # 20 s) and one ping of ours (every 30 s) landing in the same second, 5.
    frames_per_second=3.0,
    auto_ping_interval=30.0,
    auto_ping_timeout=20.0,
    # The server pings every 20 s: a minute of silence means a dead socket.
    inactivity_timeout=60.0,
    # Binance closes connections after 24 h: replace them before that.
    max_connection_age=23.5 * 3600,
    # Binance's cap is 1024 streams per connection.
    max_symbols_per_connection=1000,
    # Keep SUBSCRIBE frames small: frames over ~4 KB have been reported to get no reply.
    symbols_per_frame=100,
    # Until exchangeInfo says otherwise (it publishes the IP's weight budget).
    rest_weight_per_minute=1200 * 0.5,
)
# Of the IP's published request-weight budget, what we allow ourselves: the
# rest is headroom for anything else on the same address.
REST_BUDGET_SHARE = 0.5
EXCHANGE_INFO_WEIGHT = 20
# GET /api/v3/depth: the allowed `limit` tiers and their request weight (§1.6).
SNAPSHOT_TIERS = ((100, 5), (500, 25), (1000, 50), (5000, 250))
# A snapshot this many times the served depth: a side thinning out below the
# served depth inside the snapshot's horizon (a resync) stays rare.
SNAPSHOT_DEPTH_FACTOR = 5
# Diffs one symbol may buffer while its snapshot is in flight (or a handover
# is under way), and all symbols together: a mass reconnect of 1,500 symbols
# must not hold 1,500 × 5,000 diffs. Past either bound the symbol's buffer is
# dropped, which its snapshot then sees as a gap (→ refetch): bounded
# memory, never a silently lost diff.
MAX_BUFFERED_DIFFS = 5000
MAX_BUFFERED_DIFFS_TOTAL = 200_000


def stream_name(symbol: str) -> str:
    return f"{symbol}@depth@100ms"


def snapshot_tier(depth: int) -> tuple[int, int]:
    """(limit, weight) of the cheapest snapshot that serves `depth` with margin."""
    wanted = depth * SNAPSHOT_DEPTH_FACTOR
    for limit, weight in SNAPSHOT_TIERS:
        if limit >= wanted:
            return limit, weight
    return SNAPSHOT_TIERS[-1]


def by_last_id(event: dict[str, Any]) -> int:
    return int(event["u"])


class BufferBudget:
    """Diffs buffered across every symbol of the feed, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self, count: int) -> None:
        self.used -= count


class SyncState(enum.Enum):
    AWAITING_ACK = "awaiting-ack"  # SUBSCRIBE sent; diffs are buffered
    FETCHING = "fetching"  # snapshot requested (or its retry scheduled); diffs buffered
    LIVE = "live"  # snapshot bridged: every diff applies in sequence


class DepthSync:
    """One symbol's book kept from a snapshot plus `U`/`u`-sequenced diffs.

    AWAITING_ACK → (SUBSCRIBE acknowledged, by either connection of a
    handover) → FETCHING → (snapshot bridges the buffered diffs) → LIVE; any
    gap, bad number, crossed or thinned book → FETCHING again, the book
    withdrawn meanwhile.

    Every diff is a transaction: applied, then checked (ids, crossed,
    horizon), and only then committed to the merge. The rule for ids is
    `U <= last+1 <= u` (diffs carry absolute sizes, so an overlapping diff is
    still exact); `u <= last` is a duplicate, which lets two connections carry
    the same stream during a handover.
    """

    log = Logger()

    def __init__(
        self,
        context: FeedContext,
        book: ExchangeBook,
        connection: Connection,
        budget: BufferBudget,
    ) -> None:
        self.context = context
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.state = SyncState.AWAITING_ACK
        self.last_update_id = 0
        # The highest update id seen on the stream: a snapshot older than
        # this would roll the book back.
        self.newest_id = 0
        self.buffer: list[dict[str, Any]] = []
        # Diffs from a successor connection that ran ahead of this one.
        self.successor_buffer: list[dict[str, Any]] = []
        self.budget = budget
        self.attempts = 0  # snapshot attempts since the last success
        self.subscribe_attempts = 0
        self.request: Any = None
        self.retry: IDelayedCall | None = None
        self.snapshot_limit, self.snapshot_weight = snapshot_tier(book.depth)

    def _set_state(self, state: SyncState, reason: str) -> None:
        if state is not self.state:
            self.log.debug("binance {symbol}: sync {old} -> {new} ({reason})", symbol=self.symbol,
                           old=self.state.value, new=state.value, reason=reason)
            self.state = state

    # -- inputs -----------------------------------------------------------------

    def subscribed(self) -> None:
        """The venue acknowledged the SUBSCRIBE."""
        self.subscribe_attempts = 0
        if self.state is SyncState.AWAITING_ACK:
            self.fetch_snapshot()

    def subscribe_refused(self, connection: Connection, error: object) -> None:
        """The venue refused the SUBSCRIBE on `connection`: ask again, later."""
        delay = self.context.retry_delay(self.subscribe_attempts)
        self.subscribe_attempts += 1
        if connection is self.connection and self.state is SyncState.AWAITING_ACK:
            self.book.mark_syncing(f"SUBSCRIBE refused ({error}); retrying in {delay:.1f}s")
        self.context.resubscribe(connection, [self.symbol], delay)

    def diff(self, event: dict[str, Any], arrival: float, from_successor: bool = False) -> None:
        first, last = event.get("U"), event.get("u")
        if type(first) is not int or type(last) is not int or first > last:
            self.context.reject(
                "bad_ids", "binance {symbol}: malformed update ids U={first!r} u={last!r}",
                symbol=self.symbol, first=first, last=last,
            )
            self.resync("malformed update ids", "bad_data")
            return
        if last > self.newest_id:
            self.newest_id = last
        if self.state is not SyncState.LIVE:
            self._buffer(self.buffer, event)
        elif from_successor and first > self.last_update_id + 1:
            self._buffer(self.successor_buffer, event)  # the old connection lags
        elif self.apply(event):
            self.book.commit(arrival)

    def snapshot(self, document: Any) -> None:
        try:
            last_update_id = int(document["lastUpdateId"])
            bids = parse_levels(document["bids"])
            asks = parse_levels(document["asks"])
            self.book.book.replace(bids, asks, truncated_at=self.snapshot_limit)
        except (KeyError, TypeError, ValueError) as error:  # InvalidLevel is a ValueError
            self.context.reject("bad_snapshot", "binance {symbol}: bad snapshot ({error})",
                                symbol=self.symbol, error=error)
            self.resync(f"bad snapshot: {error}", "bad_data")
            return
        # Kept for the next snapshot if this one is too old: they are newer.
        buffered = sorted((e for e in self.buffer if e["u"] > last_update_id), key=by_last_id)
        self._release(self.buffer)
        self.buffer = buffered
        self.budget.used += len(buffered)
        if buffered:
            stale = buffered[0]["U"] > last_update_id + 1  # a gap between snapshot and stream
        else:
            stale = self.newest_id > last_update_id  # older than what the stream showed
        if stale:
            self.resync(
                f"snapshot {last_update_id} older than the stream ({self.newest_id})",
                "stale_snapshot",
            )
            return
        self._release(self.buffer)
        self.buffer = []
        self.last_update_id = last_update_id
        if not self._checks_pass():
            return
        for event in buffered:
            if not self.apply(event):
                return
        self._set_state(SyncState.LIVE, f"snapshot {last_update_id} bridged")
        self.attempts = 0
        # Once caught up: one Summary, not one per buffered diff. No frame
        # caused it (a REST answer did): no latency sample.
        self.book.go_live(None)

    def snapshot_failed(self, reason: Failure) -> None:
        self.resync(f"snapshot request failed: {reason.value}", "snapshot_failed")

    def adopt(self, connection: Connection) -> None:
        """Handover done: `connection` is ours now; catch up with what it ran ahead with."""
        self.connection = connection
        pending = sorted(self.successor_buffer, key=by_last_id)
        self._release(self.successor_buffer)
        self.successor_buffer = []
        if self.state is SyncState.LIVE and pending:
            for event in pending:
                if not self.apply(event):
                    return
            self.book.commit(None)

    def cancel(self) -> None:
        """The symbol is no longer synced here (unwatched, or its connection died)."""
        self._cancel_pending()
        self._release(self.buffer)
        self._release(self.successor_buffer)
        self.buffer = []
        self.successor_buffer = []

    # -- the transaction ----------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> bool:
        """Apply an in-sequence diff and check the result; False if it forced a
        resync (the book is then withdrawn, never committed)."""
        first, last = event["U"], event["u"]
        previous = self.last_update_id
        if last <= previous:
            return True  # already contained in the book
        if first > previous + 1:
            self.resync(f"gap: expected update {previous + 1}, got {first}-{last}", "gap")
            self._buffer(self.buffer, event)  # valid and newer: the next snapshot must bridge to it
            return False
        try:
            self.book.book.apply(parse_levels(event.get("b")), parse_levels(event.get("a")))
        except InvalidLevel as error:
            self.context.reject(
                "bad_number", "binance {symbol}: rejected update {first}-{last}: {error}",
                symbol=self.symbol, first=first, last=last, error=error,
            )
            self.resync(f"rejected update {first}-{last}: {error}", "bad_data")
            return False
        self.last_update_id = last
        return self._checks_pass()

    def _checks_pass(self) -> bool:
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

    def _buffer(self, buffer: list[dict[str, Any]], event: dict[str, Any]) -> None:
        if len(buffer) < MAX_BUFFERED_DIFFS and self.budget.take():
            buffer.append(event)
            return
        # Dropped whole: the snapshot (or the bridging after a handover) then
        # sees the gap and refetches, rather than the book missing a diff.
        metrics.BUFFER_OVERFLOWS.labels("binance").inc()
        self.context.problem(
            "buffer_overflow", "binance {symbol}: diff buffer full; dropped, will resync",
            symbol=self.symbol,
        )
        self._release(buffer)
        buffer.clear()
        if buffer is self.successor_buffer and self.state is SyncState.LIVE:
            self.resync("successor's buffer overflowed", "gap")

    def _release(self, buffer: list[dict[str, Any]]) -> None:
        self.budget.give(len(buffer))

    # -- snapshot fetching ------------------------------------------------------

    def resync(self, reason: str, cause: str) -> None:
        self.log.warn("binance {symbol}: resync ({reason})", symbol=self.symbol, reason=reason)
        metrics.RESYNCS.labels("binance", cause).inc()
        self.book.withdraw(BookState.STALE, reason)
        self._set_state(SyncState.FETCHING, reason)
        self.last_update_id = 0
        self._release(self.successor_buffer)
        self.successor_buffer = []
        self._cancel_pending()
        delay = self.context.retry_delay(self.attempts) if self.attempts else 0.0
        self.attempts += 1
        self.retry = self.context.reactor.callLater(delay, self.fetch_snapshot)

    def fetch_snapshot(self) -> None:
        self.retry = None
        self._set_state(SyncState.FETCHING, "subscribed")
        metrics.SNAPSHOT_REQUESTS.labels("binance", "snapshot").inc()
        request = self.request = self.context.http.get_json(
            f"{self.context.rest_url}/api/v3/depth"
            f"?symbol={self.context.instrument(self.symbol).native}"
            f"&limit={self.snapshot_limit}",
            weight=self.snapshot_weight,
        )
        request.addCallbacks(
            self._snapshot_answered, self._snapshot_errored,
            callbackArgs=(request,), errbackArgs=(request,),
        )

    def _snapshot_answered(self, document: Any, request: Any) -> None:
        if request is self.request:  # else cancelled or superseded
            self.request = None
            self.snapshot(document)

    def _snapshot_errored(self, reason: Failure, request: Any) -> None:
        if request is self.request:
            self.request = None
            self.snapshot_failed(reason)

    def _cancel_pending(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.cancel()
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None


class BinanceAdapter:
    """Binance's wire protocol: SUBSCRIBE/UNSUBSCRIBE by request id, depth
    diffs routed to each symbol's DepthSync."""

    name = "binance"
    settings = SETTINGS
    symbol_list_weight = float(EXCHANGE_INFO_WEIGHT)
    default_ws_url = "wss://stream.binance.com:9443"
    default_rest_url = "https://api.binance.com"
    ws_url_help = "Binance websocket base; /stream is appended."
    rest_url_help = "Binance REST base; /api/v3/... is appended."
    log = Logger()

    def __init__(self, context: FeedContext) -> None:
        self.context = context
        self.syncs: dict[str, DepthSync] = {}
        self.budget = BufferBudget(MAX_BUFFERED_DIFFS_TOTAL)
        self._next_id = 1
        # (connection, request id) → its request, until answered.
        self._requests: dict[tuple[Connection, int], tuple[str, list[str]]] = {}
        self._replies = PendingReplies(
            context.reactor, self.settings.reply_timeout, self._unanswered
        )

    # -- symbol list ------------------------------------------------------------

    # Every frame is decoded whole.
    decode = staticmethod(orjson.loads)

    def connection_url(self, ws_url: str) -> str:
        return ws_url.rstrip("/") + "/stream"

    def symbol_list_path(self) -> str:
        return "/api/v3/exchangeInfo"

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        for limit in document.get("rateLimits", ()):
            if limit.get("rateLimitType") == "REQUEST_WEIGHT" and limit.get("interval") == "MINUTE":
                per_minute = limit["limit"] / max(int(limit.get("intervalNum", 1)), 1)
                self.context.http.limiter.set_budget(per_minute * REST_BUDGET_SHARE)
        return [
            Instrument(
                entry["symbol"].upper(),
                canonical_asset(entry["baseAsset"]),
                canonical_asset(entry["quoteAsset"]),
            )
            for entry in document["symbols"]
            if entry.get("status") == "TRADING"
        ]

    # -- subscriptions -----------------------------------------------------------

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        return self._request(connection, "SUBSCRIBE", symbols)

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        return self._request(connection, "UNSUBSCRIBE", symbols)

    def _request(self, connection: Connection, method: str, symbols: list[str]) -> Any:
        request_id = self._next_id
        self._next_id += 1
        self._requests[(connection, request_id)] = (method, symbols)
        if method == "SUBSCRIBE":
            self._replies.expect(connection, request_id, symbols)
        streams = [stream_name(self.context.instrument(s).native.lower()) for s in symbols]
        return {"method": method, "params": streams, "id": request_id}

    def _unanswered(self, connection: Connection, symbols: list[str]) -> None:
        for key in [key for key in self._requests if key[0] is connection]:
            if self._requests[key][1] is symbols:
                del self._requests[key]
        self.context.subscription_unanswered(connection, symbols)

    # -- syncs ---------------------------------------------------------------------

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        sync = self.syncs[book.symbol] = DepthSync(self.context, book, connection, self.budget)
        if subscribed:
            sync.subscribed()

    def synced_on(self, symbol: str) -> Connection | None:
        sync = self.syncs.get(symbol)
        return sync.connection if sync is not None else None

    def stop_sync(self, symbol: str) -> None:
        sync = self.syncs.pop(symbol, None)
        if sync is not None:
            sync.cancel()

    def connection_reset(self, connection: Connection) -> None:
        self._replies.forget(connection)
        for key in [key for key in self._requests if key[0] is connection]:
            del self._requests[key]

    def handover(self, old: Connection, new: Connection) -> None:
        for sync in list(self.syncs.values()):
            if sync.connection is old:
                sync.adopt(new)

    def idle_probe(self, connection: Connection) -> None:
        """Binance pings us every 20 s: silence needs no probe of ours."""

    def stop(self) -> None:
        self._replies.clear()
        self._requests.clear()

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        if not isinstance(message, dict):
            self.context.reject("unexpected", "binance: unexpected message {message!r}",
                                message=message)
            return
        data = message.get("data")
        if isinstance(data, dict):
            event = data.get("e")
            if event == "depthUpdate":
                self._depth_update(connection, str(message.get("stream")), data, arrival)
            elif event == "serverShutdown":
                self.context.rotate(connection, "server shutdown announced")
            return
        if "id" in message:
            self._reply(connection, message)
            return
        self.context.reject("unexpected", "binance: unexpected message {message!r}",
                            message=message)

    def _depth_update(
        self, connection: Connection, stream: str, data: dict[str, Any], arrival: float
    ) -> None:
        symbol = self.context.symbol_of(stream.partition("@")[0].upper())
        sync = self.syncs.get(symbol) if symbol is not None else None
        if sync is None:
            return  # not (or no longer) watched
        if connection is sync.connection:
            sync.diff(data, arrival)
        elif self.context.predecessor(connection) is sync.connection:
            sync.diff(data, arrival, from_successor=True)

    def _reply(self, connection: Connection, message: dict[str, Any]) -> None:
        request_id = message["id"]
        if type(request_id) is not int:
            self.context.reject("unexpected", "binance: reply with id {id!r}", id=request_id)
            return
        self._replies.answered(connection, request_id)
        method, symbols = self._requests.pop((connection, request_id), ("", []))
        error = message.get("error")
        if error is not None:
            self.context.reject("error_reply", "binance: {method} {symbols} refused: {error}",
                                method=method, symbols=symbols, error=error)
            if method == "SUBSCRIBE":
                metrics.SUBSCRIBE_RETRIES.labels(self.name, "refused").inc()
                for symbol in symbols:
                    sync = self.syncs.get(symbol)
                    if sync is not None:
                        sync.subscribe_refused(connection, error)
            return
        if method == "SUBSCRIBE":
            for symbol in symbols:
                sync = self.syncs.get(symbol)
                # Either connection of a handover may answer first: both carry the stream.
                if sync is not None and (
                    sync.connection is connection
                    or self.context.predecessor(connection) is sync.connection
                ):
                    sync.subscribed()
