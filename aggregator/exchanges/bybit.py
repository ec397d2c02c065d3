"""Bybit v5 spot: `orderbook.{depth}.{symbol}` topics, snapshots in band,
deltas checked by update id.

Protocol facts: docs/PROTOCOLS.md §5.1. After a subscription Bybit sends the
topic's snapshot, then a delta per change, each with the topic's update id
`u`, one more per message. Every delta must carry the previous `u` + 1: a
gap (or bad data, or a crossed book, which Bybit's matching engine never
publishes) withdraws the book and resubscribes the topic. An unsubscribe and
a subscribe are the venue's only way to get a fresh snapshot in band (its
REST book is blocked in some regions, §5.1): a resync costs two frames and
no REST call. A later snapshot, and any message with `u == 1` (the venue's
service restarted), replace the book.

Channel depth: 50 by default (the served depth is 10). The 50-level topic
is pushed every 20 ms, 200 and 1000 only every 200 ms; level 1 carries a
single level. So the smallest of 50/200/1000 that covers the book's served
depth is chosen per symbol: depths up to 50 get the fast topic, deeper
books pay the slower push, and a depth above 1000 (Bybit's deepest topic)
gets at most 1000 levels per side. Bybit keeps the client's copy of the topic at
that depth (levels leaving the window are deleted; PROTOCOLS marks this
unverified), so the book needs no horizon check; anything it holds beyond
the window is trimmed.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable

import orjson
from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import BookState, ExchangeBook, InvalidLevel, parse_levels
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.venue import FeedContext, PendingReplies, VenueSettings
from aggregator.instruments import Instrument, canonical_asset

SETTINGS = VenueSettings(
    # Bybit documents no rate for public subscribe frames: stay as low as
    # Binance's budget, which a resync burst (two frames per symbol) fits.
    frames_per_second=5.0,
    auto_ping_interval=20.0,
    auto_ping_timeout=10.0,
    # Bybit wants a client ping every 20 s (§5.1): the feed probes after half
    # of this in silence (idle_probe sends {"op":"ping"}), so a quiet
    # connection pings every 20-30 s and a dead one is dropped after 40 s.
    inactivity_timeout=40.0,
    # A public connection's topics may total 21,000 characters (§5.1);
    # "orderbook.1000.XXXXXXXXUSDT" is under 30: 500 of them stay well inside.
    max_symbols_per_connection=500,
    # Spot accepts at most 10 args per subscribe request (§5.1).
    symbols_per_frame=10,
    # 600 requests per 5 s per IP; only the instrument list uses REST here.
    rest_weight_per_minute=600.0,
)
# orderbook.{depth}: the delta topics, shallowest (fastest push) first.
TOPIC_DEPTHS = (50, 200, 1000)
TOPIC_PREFIX = "orderbook."
# Deltas a successor connection may run ahead of the connection it replaces,
# per symbol; past this the symbol resyncs rather than holding more.
MAX_AHEAD = 1000


def topic_depth(served_depth: int) -> int:
    """The shallowest topic depth that covers `served_depth` levels (1000 at most)."""
    for depth in TOPIC_DEPTHS:
        if depth >= served_depth:
            return depth
    return TOPIC_DEPTHS[-1]


class SyncState(enum.Enum):
    # Subscribe sent (or a resync's unsubscribe + subscribe under way): no
    # book; the next snapshot makes it live.
    SUBSCRIBING = "subscribing"
    LIVE = "live"  # snapshot applied; every delta continues its `u`


class TopicSync:
    """One symbol's book from its topic: snapshot, then `u`-sequenced deltas.

    SUBSCRIBING → (snapshot, or any `u == 1` message) → LIVE; a gap, bad
    data or a crossed book → SUBSCRIBING again (book withdrawn, the topic
    unsubscribed and subscribed again). While a resync's unsubscribe is
    unanswered, messages of the old subscription may still arrive: they are
    ignored until its reply, after which the venue sends only the new
    subscription's (it answers requests in order).
    """

    log = Logger()

    def __init__(
        self,
        context: FeedContext,
        book: ExchangeBook,
        connection: Connection,
        unsubscribe: Callable[[Connection, list[str]], None],
    ) -> None:
        self.context = context
        self._unsubscribe = unsubscribe  # sends an unsubscribe frame now
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.topic_depth = topic_depth(book.depth)
        self.state = SyncState.SUBSCRIBING
        self.last_u = 0
        self.draining = False  # a resync's unsubscribe is unanswered
        self.attempts = 0  # resyncs since the last in-sequence delta
        # Deltas the successor of a handover delivered ahead of `connection`, by u.
        self.ahead: dict[int, dict[str, Any]] = {}

    def _set_state(self, state: SyncState, reason: str) -> None:
        if state is not self.state:
            self.log.debug("bybit {symbol}: sync {old} -> {new} ({reason})", symbol=self.symbol,
                           old=self.state.value, new=state.value, reason=reason)
            self.state = state

    # -- inputs -----------------------------------------------------------------

    def subscribe_refused(self, error: object) -> None:
        self.resync(f"subscription refused ({error})", "refused", BookState.SYNCING, backoff=True)

    def unsubscribed(self) -> None:
        """The resync's unsubscribe was answered: what follows is the new subscription's."""
        self.draining = False

    def message(self, kind: object, data: Any, arrival: float,
                from_successor: bool = False) -> None:
        if self.draining and not from_successor:
            return  # the old subscription's, before our unsubscribe took effect
        if not isinstance(data, dict):
            self.context.reject("bad_data", "bybit {symbol}: message without data",
                                symbol=self.symbol)
            self.resync("message without data", "bad_data")
            return
        u = data.get("u")
        if type(u) is not int or u < 1:
            self.context.reject("bad_ids", "bybit {symbol}: malformed update id u={u!r}",
                                symbol=self.symbol, u=u)
            self.resync(f"malformed update id {u!r}", "bad_data")
            return
        if kind == "snapshot" or u == 1:
            if from_successor and self.state is SyncState.LIVE and 1 < u <= self.last_u:
                return  # the successor's own (older) starting point
            what = "restart" if u == 1 else "snapshot"
            self.snapshot(data, u, arrival, "successor's " + what if from_successor else what)
        elif kind == "delta":
            if self.state is SyncState.LIVE:
                self.delta(data, u, arrival, from_successor)
        else:
            self.context.reject("unexpected", "bybit {symbol}: message type {kind!r}",
                                symbol=self.symbol, kind=kind)

    def snapshot(self, data: dict[str, Any], u: int, arrival: float, what: str) -> None:
        try:
            bids, asks = parse_levels(data.get("b")), parse_levels(data.get("a"))
            self.book.book.replace(bids, asks)
        except InvalidLevel as error:
            self._rejected(u, error)
            return
        self.last_u = u
        self.ahead.clear()
        if not self._checks_pass():
            return
        was_live = self.book.live
        self._set_state(SyncState.LIVE, f"{what} u={u}")
        if was_live:
            if what in ("snapshot", "restart"):  # the venue's reset, not a successor's start
                metrics.BOOK_RESETS.labels("bybit", what).inc()
                self.log.info("bybit {symbol}: book replaced by a {what} (u={u})",
                              symbol=self.symbol, what=what, u=u)
            self.book.commit(arrival)
        else:
            self.book.go_live(arrival)

    def delta(self, data: dict[str, Any], u: int, arrival: float, from_successor: bool) -> None:
        if u <= self.last_u:
            return  # already applied (both connections of a handover carry the topic)
        if u > self.last_u + 1:
            if from_successor:
                self._hold(data, u)  # the old connection still has to deliver the ones between
            else:
                self.resync(f"gap: expected u={self.last_u + 1}, got {u}", "gap")
            return
        if self.apply(data, u) and self._drain_ahead():
            self.attempts = 0
            self.book.commit(arrival)

    def adopt(self, connection: Connection) -> None:
        """Handover done: `connection` is ours; what it ran ahead with must now continue."""
        self.connection = connection
        if self.state is SyncState.LIVE and self.ahead:
            self.resync(f"gap at handover: expected u={self.last_u + 1}, "
                        f"successor at {min(self.ahead)}", "gap")
        elif self.state is SyncState.SUBSCRIBING:
            # Waiting on the old connection (a resync, or its first snapshot),
            # and `connection`'s own snapshot came too early to count: ask it for one.
            self._resubscribe()

    # -- the transaction ----------------------------------------------------------

    def apply(self, data: dict[str, Any], u: int) -> bool:
        try:
            self.book.book.apply(parse_levels(data.get("b")), parse_levels(data.get("a")))
        except InvalidLevel as error:
            self._rejected(u, error)
            return False
        self.last_u = u
        return self._checks_pass()

    def _drain_ahead(self) -> bool:
        while self.ahead:
            data = self.ahead.pop(self.last_u + 1, None)
            if data is None:
                self.ahead = {u: d for u, d in self.ahead.items() if u > self.last_u}
                return True
            if not self.apply(data, self.last_u + 1):
                return False
        return True

    def _checks_pass(self) -> bool:
        book = self.book.book
        self._trim()
        if book.is_crossed():
            # Bybit's own book never crosses (it matches): ours is out of sync.
            metrics.CROSSED.labels("bybit").inc()
            self.resync("book crossed: our copy is out of sync", "crossed")
            return False
        return True

    def _trim(self) -> None:
        """Drop levels beyond the topic's window: Bybit no longer updates them."""
        bids, asks = self.book.book.depth()
        depth = self.topic_depth
        if bids > depth or asks > depth:
            book = self.book.book
            book.apply([(p, 0.0) for p, _ in book.top_bids(bids)[depth:]],
                       [(p, 0.0) for p, _ in book.top_asks(asks)[depth:]])

    def _hold(self, data: dict[str, Any], u: int) -> None:
        if len(self.ahead) >= MAX_AHEAD:
            metrics.BUFFER_OVERFLOWS.labels("bybit").inc()
            self.resync("successor ran too far ahead", "gap")
            return
        self.ahead[u] = data

    def _rejected(self, u: int, error: Exception) -> None:
        self.context.reject("bad_number", "bybit {symbol}: rejected message u={u}: {error}",
                            symbol=self.symbol, u=u, error=error)
        self.resync(f"rejected message u={u}: {error}", "bad_data")

    # -- resync -------------------------------------------------------------------

    def resync(
        self, reason: str, cause: str, state: BookState = BookState.STALE, backoff: bool = False
    ) -> None:
        """Withdraw the book; unsubscribe the topic and subscribe it again (a fresh snapshot).

        A data problem is resubscribed at once the first time (the venue is
        fine, our copy is not); a refused or unanswered subscription waits
        (`backoff`), and every repeat waits longer."""
        self.log.warn("bybit {symbol}: resync ({reason})", symbol=self.symbol, reason=reason)
        metrics.RESYNCS.labels("bybit", cause).inc()
        self.book.withdraw(state, reason)
        self._set_state(SyncState.SUBSCRIBING, reason)
        self._resubscribe(backoff)

    def renew_subscription(self) -> None:
        """Subscribe the topic afresh (unsubscribe first): its snapshot starts the book."""
        self._resubscribe()

    def _resubscribe(self, backoff: bool = False) -> None:
        self.last_u = 0
        self.ahead.clear()
        self.draining = True
        delay = self.context.retry_delay(self.attempts) if self.attempts or backoff else 0.0
        self.attempts += 1
        # Queued ahead of the subscribe: the venue answers in order, so its
        # reply marks the end of the old subscription's messages.
        self._unsubscribe(self.connection, [self.symbol])
        self.context.resubscribe(self.connection, [self.symbol], delay)


class BybitAdapter:
    """Bybit's wire protocol: op subscribe/unsubscribe by req_id, topic
    messages routed to each symbol's TopicSync."""

    name = "bybit"
    settings = SETTINGS
    symbol_list_weight = 1.0
    default_ws_url = "wss://stream.bybit.com"
    default_rest_url = "https://api.bybit.com"
    ws_url_help = "Bybit websocket base; /v5/public/spot is appended."
    rest_url_help = "Bybit REST base; /v5/market/... is appended."
    log = Logger()

    def __init__(self, context: FeedContext) -> None:
        self.context = context
        self.syncs: dict[str, TopicSync] = {}
        self._next_id = 1
        # (connection, req_id) → (op, symbols), until answered.
        self._requests: dict[tuple[Connection, str], tuple[str, list[str]]] = {}
        # The topic each symbol was subscribed with: its unsubscribes (on each
        # connection of a handover, after its book is gone) must name the same.
        # Bounded by the venue's symbol count.
        self._topics: dict[str, str] = {}
        self._replies = PendingReplies(
            context.reactor, self.settings.reply_timeout, self._unanswered
        )

    # -- symbol list ------------------------------------------------------------

    # Every frame is decoded whole.
    decode = staticmethod(orjson.loads)

    def connection_url(self, ws_url: str) -> str:
        return ws_url.rstrip("/") + "/v5/public/spot"

    def symbol_list_path(self) -> str:
        # Spot is not paginated: one answer lists every pair (§5.1).
        return "/v5/market/instruments-info?category=spot"

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        if document.get("retCode") != 0:
            raise ValueError(f"instrument list refused: {document.get('retMsg')!r}")
        return [
            Instrument(entry["symbol"], canonical_asset(entry["baseCoin"]),
                       canonical_asset(entry["quoteCoin"]))
            for entry in document["result"]["list"]
            if entry.get("status") == "Trading"
        ]

    # -- subscriptions -----------------------------------------------------------

    def _topic(self, symbol: str) -> str:
        book = self.context.books.get(symbol)
        depth = topic_depth(book.depth) if book is not None else TOPIC_DEPTHS[0]
        return f"{TOPIC_PREFIX}{depth}.{self.context.instrument(symbol).native}"

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        for symbol in symbols:
            self._topics[symbol] = self._topic(symbol)
        return self._request(connection, "subscribe", symbols)

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        return self._request(connection, "unsubscribe", symbols)

    def _request(self, connection: Connection, op: str, symbols: list[str]) -> Any:
        req_id = str(self._next_id)
        self._next_id += 1
        self._requests[(connection, req_id)] = (op, symbols)
        self._replies.expect(connection, req_id, symbols)
        topics = [self._topics.get(symbol) or self._topic(symbol) for symbol in symbols]
        return {"req_id": req_id, "op": op, "args": topics}

    def _send_unsubscribe(self, connection: Connection, symbols: list[str]) -> None:
        connection.send(self._request(connection, "unsubscribe", symbols))

    def _unanswered(self, connection: Connection, symbols: list[str]) -> None:
        op = ""
        for key in [key for key in self._requests if key[0] is connection]:
            if self._requests[key][1] is symbols:
                op, _ = self._requests.pop(key)
        if op == "unsubscribe":
            # Nothing to wait for any more: take the next snapshot as the new one.
            for symbol in symbols:
                sync = self.syncs.get(symbol)
                if sync is not None and sync.connection is connection:
                    sync.unsubscribed()
            return
        metrics.SUBSCRIBE_RETRIES.labels(self.name, "timeout").inc()
        self.context.problem("subscribe_timeout", "{connection}: no reply to subscribe {symbols}; "
                             "subscribing again", connection=connection.label, symbols=symbols)
        for symbol in symbols:
            sync = self.syncs.get(symbol)
            if sync is not None and sync.connection is connection:
                sync.resync("no reply to subscribe", "timeout", BookState.SYNCING, backoff=True)

    # -- syncs ---------------------------------------------------------------------

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        # The next snapshot on the topic makes the book live. A topic that is
        # already streaming sends none by itself (only deltas): ask for one.
        sync = self.syncs[book.symbol] = TopicSync(
            self.context, book, connection, self._send_unsubscribe
        )
        if subscribed:
            sync.renew_subscription()

    def synced_on(self, symbol: str) -> Connection | None:
        sync = self.syncs.get(symbol)
        return sync.connection if sync is not None else None

    def stop_sync(self, symbol: str) -> None:
        self.syncs.pop(symbol, None)

    def connection_reset(self, connection: Connection) -> None:
        self._replies.forget(connection)
        for key in [key for key in self._requests if key[0] is connection]:
            del self._requests[key]

    def handover(self, old: Connection, new: Connection) -> None:
        for sync in list(self.syncs.values()):
            if sync.connection is old:
                sync.adopt(new)

    def idle_probe(self, connection: Connection) -> None:
        connection.send({"op": "ping"})

    def stop(self) -> None:
        self._replies.clear()
        self._requests.clear()

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        if not isinstance(message, dict):
            self.context.reject("unexpected", "bybit: unexpected message {message!r}",
                                message=message)
            return
        topic = message.get("topic")
        if isinstance(topic, str):
            self._topic_message(connection, topic, message, arrival)
            return
        op = message.get("op")
        if op in ("subscribe", "unsubscribe"):
            self._reply(connection, message)
        elif op not in ("ping", "pong"):
            self.context.reject("unexpected", "bybit: unexpected message {message!r}",
                                message=message)

    def _topic_message(
        self, connection: Connection, topic: str, message: dict[str, Any], arrival: float
    ) -> None:
        prefix, _, native = topic.rpartition(".")
        if not prefix.startswith(TOPIC_PREFIX):
            self.context.reject("unexpected", "bybit: unexpected topic {topic!r}", topic=topic)
            return
        symbol = self.context.symbol_of(native)
        sync = self.syncs.get(symbol) if symbol is not None else None
        if sync is None or prefix != f"{TOPIC_PREFIX}{sync.topic_depth}":
            return  # not (or no longer) watched
        if connection is sync.connection:
            from_successor = False
        elif self.context.predecessor(connection) is sync.connection:
            from_successor = True
        else:
            return  # a connection handed over, or not carrying it
        sync.message(message.get("type"), message.get("data"), arrival, from_successor)

    def _reply(self, connection: Connection, message: dict[str, Any]) -> None:
        req_id = message.get("req_id")
        key = str(req_id)
        self._replies.answered(connection, key)
        op, symbols = self._requests.pop((connection, key), ("", []))
        if not symbols:
            return  # not ours, or answered after its timeout
        if op == "unsubscribe":
            # Success or not (a topic that was never subscribed): the old
            # subscription's messages are all in.
            for symbol in symbols:
                sync = self.syncs.get(symbol)
                if sync is not None and sync.connection is connection:
                    sync.unsubscribed()
            return
        if message.get("success") is True:
            return  # the snapshot that follows makes each book live
        error = message.get("ret_msg")
        self.context.reject("error_reply", "bybit: subscribe {symbols} refused: {error}",
                            symbols=symbols, error=error)
        for symbol in symbols:
            sync = self.syncs.get(symbol)
            if sync is not None and (
                sync.connection is connection
                or self.context.predecessor(connection) is sync.connection
            ):
                metrics.SUBSCRIBE_RETRIES.labels(self.name, "refused").inc()
                if sync.connection is connection:
                    sync.subscribe_refused(error)
                else:
                    self._send_unsubscribe(connection, [symbol])
                    self.context.resubscribe(connection, [symbol],
                                             self.context.retry_delay(sync.attempts))
