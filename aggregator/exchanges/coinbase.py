"""Coinbase Advanced Trade: the `level2` channel (the whole book in band, then
absolute sizes), kept honest by the connection-wide `sequence_num` and the
`heartbeats` channel.

Why `level2`: it is Coinbase's one public book channel, full depth, and it
"guarantees delivery of all updates": the first event of a product is its
whole book, the rest are absolute sizes (`"0"` deletes). No REST snapshot is
needed, nor could one be bridged (the REST book carries no sequence number).

How a lost update shows: `sequence_num` numbers every message of one
connection, whatever its channel or product. A gap says that something of
that connection was lost, never which product's, so every book synced from
it is withdrawn and the connection is replaced by a fresh one (a reconnect),
whose subscriptions bring a new snapshot of every product. Why a reconnect
rather than resubscribing on the same socket: subscribing again to a product
already subscribed is not documented to send a new snapshot (clients of the
older feed unsubscribe first to get one), while a new connection always
starts with snapshots and a new sequence; a gap usually means the socket
itself is in trouble (a slow or stalled consumer), which a new one cures.
A single product going bad (a bad number, a crossed book) resyncs alone: it
is unsubscribed and subscribed again on its connection, for a new snapshot.

Heartbeats: Coinbase closes channels that stay quiet for 60-90 s unless the
connection subscribes `heartbeats` (one message a second). They are
subscribed once per connection; when they stop while the connection stays
open, the connection is replaced make-before-break (its books stay live:
their messages are still in sequence). Facts: docs/PROTOCOLS.md §5.2.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable

import orjson
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import BookState, ExchangeBook, InvalidLevel, Level, parse_number
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.venue import FeedContext, PendingReplies, VenueSettings
from aggregator.instruments import Instrument, canonical_asset

BOOK_CHANNEL = "level2"
HEARTBEATS_SUBSCRIBE = {"type": "subscribe", "channel": "heartbeats"}
# The channels of the messages read here; they all carry the connection's sequence_num.
CHANNELS = ("l2_data", "heartbeats", "subscriptions")

SETTINGS = VenueSettings(
    # 8 unauthenticated messages per second per IP (§5.2): half of it per
    # connection leaves room for a successor subscribing during a handover.
    frames_per_second=4.0,
    auto_ping_interval=30.0,
    auto_ping_timeout=10.0,
    # Heartbeats come every second: 5 s of total silence is a dead socket.
    # Also what makes idle_probe subscribe heartbeats on a connection that has
    # no symbol yet before Coinbase's 5 s subscribe deadline closes it.
    inactivity_timeout=5.0,
    # Every book of a connection resyncs on one gap: smaller connections
    # keep what a gap costs small.
    max_symbols_per_connection=100,
    # One channel per subscribe message, any number of products (§5.2).
    symbols_per_frame=50,
    reply_timeout=10.0,
    # Public REST: ~10 requests/s per IP; only the product list uses it.
    rest_weight_per_minute=300.0,
)


class SyncState(enum.Enum):
    AWAITING_ACK = "awaiting-ack"  # subscribe sent
    AWAITING_SNAPSHOT = "awaiting-snapshot"  # acknowledged (or resyncing); updates ignored
    LIVE = "live"  # the snapshot and every update since, in sequence


def parse_updates(updates: object) -> tuple[list[Level], list[Level]]:
    """A level2 event's `updates` → (bids, asks); InvalidLevel for anything malformed."""
    if type(updates) is not list:
        raise InvalidLevel(f"updates must be a list, not {type(updates).__name__}")
    bids: list[Level] = []
    asks: list[Level] = []
    for update in updates:
        if type(update) is not dict:
            raise InvalidLevel(f"an update must be an object: {update!r}")
        level = (parse_number(update.get("price_level")), parse_number(update.get("new_quantity")))
        side = update.get("side")
        if side == "bid":
            bids.append(level)
        elif side == "offer":
            asks.append(level)
        else:
            raise InvalidLevel(f"unknown side {side!r}")
    return bids, asks


class ProductSync:
    """One product's book: a snapshot, then every update of its connection.

    AWAITING_ACK → (acknowledged) → AWAITING_SNAPSHOT → (snapshot, from the
    connection or its successor) → LIVE; a bad update or a crossed book →
    AWAITING_SNAPSHOT (the product alone is subscribed again); a gap on the
    connection → AWAITING_SNAPSHOT (withdrawn; the connection is replaced).
    Each update is a transaction: applied, checked, then committed.
    """

    log = Logger()

    def __init__(self, adapter: CoinbaseAdapter, book: ExchangeBook, connection: Connection) -> None:
        self.adapter = adapter
        self.context = adapter.context
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.state = SyncState.AWAITING_ACK
        self.attempts = 0  # resyncs since the book was last live
        self.subscribe_attempts = 0
        self.retry: IDelayedCall | None = None

    def _set_state(self, state: SyncState, reason: str) -> None:
        if state is not self.state:
            self.log.debug("coinbase {symbol}: sync {old} -> {new} ({reason})", symbol=self.symbol,
                           old=self.state.value, new=state.value, reason=reason)
            self.state = state

    # -- inputs -----------------------------------------------------------------

    def subscribed(self) -> None:
        self.subscribe_attempts = 0
        if self.state is SyncState.AWAITING_ACK:
            self._set_state(SyncState.AWAITING_SNAPSHOT, "subscription acknowledged")

    def subscribe_refused(self, connection: Connection, error: object) -> None:
        delay = self.context.retry_delay(self.subscribe_attempts)
        self.subscribe_attempts += 1
        if connection is self.connection and self.state is not SyncState.LIVE:
            self.book.mark_syncing(f"subscription refused ({error}); retrying in {delay:.1f}s")
        self.context.resubscribe(connection, [self.symbol], delay)

    def snapshot(self, connection: Connection, bids: list[Level], asks: list[Level],
                 arrival: float) -> None:
        """The product's whole book, from its connection or (make-before-break)
        from the successor, which the product then follows."""
        try:
            self.book.book.replace(bids, asks)
        except InvalidLevel as error:
            self.rejected("snapshot", error)
            return
        self.connection = connection
        self._cancel_retry()
        if not self._checks_pass():
            return
        self._set_state(SyncState.LIVE, "snapshot")
        self.attempts = 0
        if self.book.live:
            self.book.commit(arrival)
        else:
            self.book.go_live(arrival)

    def update(self, bids: list[Level], asks: list[Level], arrival: float) -> None:
        if self.state is not SyncState.LIVE:
            return  # nothing to apply it to: the coming snapshot includes it
        try:
            self.book.book.apply(bids, asks)
        except InvalidLevel as error:
            self.rejected("update", error)
            return
        if self._checks_pass():
            self.book.commit(arrival)

    def rejected(self, what: str, error: Exception) -> None:
        self.context.reject(
            "bad_number" if isinstance(error, InvalidLevel) else "bad_data",
            "coinbase {symbol}: rejected {what}: {error}", symbol=self.symbol, what=what,
            error=error,
        )
        self.resync(f"rejected {what}: {error}", "bad_data")

    def _checks_pass(self) -> bool:
        if self.book.book.is_crossed():
            # Coinbase matches crossing orders: a crossed copy is out of sync.
            metrics.CROSSED.labels("coinbase").inc()
            self.resync("book crossed: our copy is out of sync", "crossed")
            return False
        return True

    # -- actions ----------------------------------------------------------------

    def resync(self, reason: str, cause: str) -> None:
        """This product alone went wrong: withdraw it and ask for a new snapshot."""
        self.log.warn("coinbase {symbol}: resync ({reason})", symbol=self.symbol, reason=reason)
        metrics.RESYNCS.labels("coinbase", cause).inc()
        self.withdraw(BookState.STALE, reason)
        delay = self.context.retry_delay(self.attempts) if self.attempts else 0.0
        self.attempts += 1
        self.retry = self.context.reactor.callLater(delay, self._request_snapshot)

    def withdraw(self, state: BookState, reason: str) -> None:
        """Withheld until a snapshot comes (asked for by whoever withdrew it)."""
        self._cancel_retry()
        self.book.withdraw(state, reason)
        self._set_state(SyncState.AWAITING_SNAPSHOT, reason)

    def _request_snapshot(self) -> None:
        self.retry = None
        self.adapter.request_snapshot(self.connection, [self.symbol])

    def _cancel_retry(self) -> None:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None

    def cancel(self) -> None:
        self._cancel_retry()


@dataclass
class Session:
    """One socket of a connection (a Connection reconnects: `opens` tells its
    sockets apart): its message sequence and its heartbeats."""

    opens: int
    last_heartbeat: float
    next_sequence: int | None = None  # None until the first message
    heartbeats_subscribed: bool = False
    broken: bool = False  # a gap was seen: being dropped, nothing on it counts
    replacing: bool = False  # heartbeats stopped: a successor was asked for
    heartbeats_call: IDelayedCall | None = None  # the heartbeats subscription, queued

    def close(self) -> None:
        if self.heartbeats_call is not None and self.heartbeats_call.active():
            self.heartbeats_call.cancel()
        self.heartbeats_call = None


class CoinbaseAdapter:
    """Coinbase's wire protocol: level2 subscriptions (one channel per frame),
    messages routed per product, sequence and heartbeats checked per socket."""

    name = "coinbase"
    settings = SETTINGS
    symbol_list_weight = 1.0
    default_ws_url = "wss://advanced-trade-ws.coinbase.com"
    default_rest_url = "https://api.coinbase.com"
    ws_url_help = "Coinbase websocket URL (used as is)."
    rest_url_help = "Coinbase REST base; /api/v3/brokerage/market/products is appended."
    # Heartbeats come every second; this long without one (while the socket
    # stays open) and the connection is replaced.
    heartbeat_timeout = 5.0
    log = Logger()

    def __init__(self, context: FeedContext) -> None:
        self.context = context
        self.syncs: dict[str, ProductSync] = {}
        self.sessions: dict[Connection, Session] = {}
        # Keyed by (connection, symbol): a subscription is answered by its snapshot.
        self._replies = PendingReplies(
            context.reactor, self.settings.reply_timeout, context.subscription_unanswered
        )
        self._watchdog: LoopingCall | None = None

    # -- symbol list ------------------------------------------------------------

    # Every frame is decoded whole.
    decode = staticmethod(orjson.loads)

    def connection_url(self, ws_url: str) -> str:
        return ws_url

    def symbol_list_path(self) -> str:
        return "/api/v3/brokerage/market/products?product_type=SPOT"

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        instruments = []
        for entry in document["products"]:
            native = entry["product_id"]
            if entry.get("product_type", "SPOT") != "SPOT":
                continue
            if str(entry.get("status", "")).lower() != "online" or entry.get("trading_disabled"):
                continue
            alias = entry.get("alias")
            if alias and alias != native:
                # BTC-USDC is an alias of BTC-USD: level2 streams the USD book for it (§5.2).
                continue
            base, dash, quote = native.partition("-")
            if not dash:
                raise ValueError(f"product id {native!r} is not BASE-QUOTE")
            instruments.append(Instrument(
                native,
                canonical_asset(entry.get("base_currency_id") or base),
                canonical_asset(entry.get("quote_currency_id") or quote),
            ))
        return instruments

    # -- subscriptions -----------------------------------------------------------

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        self._heartbeats(connection)
        for symbol in symbols:
            self._replies.expect(connection, symbol, [symbol])
        return self._frame("subscribe", symbols)

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        for symbol in symbols:
            self._replies.answered(connection, symbol)
        return self._frame("unsubscribe", symbols)

    def _frame(self, kind: str, symbols: list[str]) -> dict[str, Any]:
        products = [self.context.instrument(symbol).native for symbol in symbols]
        return {"type": kind, "product_ids": products, "channel": BOOK_CHANNEL}

    def request_snapshot(self, connection: Connection, symbols: list[str]) -> None:
        """A new snapshot of products the connection streams: unsubscribed and
        subscribed again (a second subscribe alone is not known to send one).
        Not through the pool: for it they stay subscribed throughout."""
        if not connection.connected:
            return  # its reconnect subscribes them anew
        for symbol in symbols:
            self._replies.expect(connection, symbol, [symbol])
        connection.send(self._frame("unsubscribe", symbols))
        connection.send(self._frame("subscribe", symbols))

    def _heartbeats(self, connection: Connection) -> None:
        """Subscribe the socket's heartbeats, once. Queued from the next reactor
        turn: subscribe_frame runs inside the connection's send loop, which a
        send() of its own must not re-enter."""
        session = self._session(connection)
        if not session.heartbeats_subscribed:
            session.heartbeats_subscribed = True
            session.last_heartbeat = self.context.reactor.seconds()
            session.heartbeats_call = self.context.reactor.callLater(
                0, connection.send, HEARTBEATS_SUBSCRIBE
            )


    # -- syncs ---------------------------------------------------------------------

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        sync = self.syncs[book.symbol] = ProductSync(self, book, connection)
        if book.live:
            book.mark_syncing(f"subscribing on {connection.label}")
        if subscribed:
            # Streamed already, but its snapshot went to a sync that is gone.
            sync.subscribed()
            self.request_snapshot(connection, [book.symbol])

    def synced_on(self, symbol: str) -> Connection | None:
        sync = self.syncs.get(symbol)
        return sync.connection if sync is not None else None

    def stop_sync(self, symbol: str) -> None:
        sync = self.syncs.pop(symbol, None)
        if sync is not None:
            sync.cancel()

    def connection_reset(self, connection: Connection) -> None:
        self._replies.forget(connection)
        session = self.sessions.pop(connection, None)
        if session is not None:
            session.close()

    def handover(self, old: Connection, new: Connection) -> None:
        for sync in self.syncs.values():
            if sync.connection is old:
                # Its successor's snapshot has not come yet: from here on only
                # the successor counts, and its updates need that snapshot.
                sync.connection = new
                if sync.state is SyncState.LIVE:
                    sync.withdraw(BookState.SYNCING, "handed over; awaiting the new snapshot")

    def idle_probe(self, connection: Connection) -> None:
        # Heartbeats answer every second: also what keeps a connection that
        # carries no symbol yet from being closed for not subscribing.
        self._heartbeats(connection)

    def stop(self) -> None:
        self._replies.clear()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()

    # -- sockets: sequence and heartbeats ----------------------------------------------

    def _session(self, connection: Connection) -> Session:
        session = self.sessions.get(connection)
        if session is None or session.opens != connection.opens:
            if session is not None:
                session.close()
            session = self.sessions[connection] = Session(
                connection.opens, self.context.reactor.seconds()
            )
            if self._watchdog is None:
                self._watchdog = LoopingCall(self._check_heartbeats)
                self._watchdog.clock = self.context.reactor
                self._watchdog.start(self.heartbeat_timeout / 4, now=False)
        return session

    def _check_heartbeats(self) -> None:
        now = self.context.reactor.seconds()
        for connection, session in list(self.sessions.items()):
            if not connection.connected or connection.opens != session.opens:
                self.sessions.pop(connection).close()  # that socket is gone
                continue
            if not session.heartbeats_subscribed or session.broken or session.replacing:
                continue
            silent = now - session.last_heartbeat
            # Only heartbeats missing, other messages still coming: a socket
            # entirely silent is the inactivity timeout's (it drops it).
            talking = now - connection.last_activity <= self.heartbeat_timeout
            if (silent > self.heartbeat_timeout and talking
                    and self.context.predecessor(connection) is None):
                session.replacing = True
                self.log.warn("{connection}: no heartbeat for {silent:.1f}s while open; "
                              "replacing it", connection=connection.label, silent=silent)
                self.context.rotate(connection, "heartbeats stopped")

    def _in_sequence(self, connection: Connection, session: Session, message: dict[str, Any]) -> bool:
        sequence = message.get("sequence_num")
        if type(sequence) is not int:
            self.context.reject("bad_sequence", "coinbase: {connection}: sequence_num {sequence!r}",
                                connection=connection.label, sequence=sequence)
            self._resync_connection(connection, session, f"unreadable sequence_num {sequence!r}",
                                    "bad_data")
            return False
        expected = session.next_sequence
        if expected is not None and sequence != expected:
            self._resync_connection(
                connection, session, f"sequence gap: expected {expected}, got {sequence}", "gap"
            )
            return False
        session.next_sequence = sequence + 1
        return True

    def _resync_connection(self, connection: Connection, session: Session, reason: str,
                           cause: str) -> None:
        """Something of `connection` was lost: every book it feeds is suspect.
        They are withdrawn and the connection is replaced (see the module docstring)."""
        session.broken = True
        affected = [sync for sync in self.syncs.values() if sync.connection is connection]
        for sync in affected:
            metrics.RESYNCS.labels(self.name, cause).inc()
            sync.withdraw(BookState.STALE, reason)
        self.log.warn("{connection}: {reason}; reconnecting to resync {count} books",
                      connection=connection.label, reason=reason, count=len(affected))
        connection.drop()

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        if not isinstance(message, dict):
            self.context.reject("unexpected", "coinbase: unexpected message {message!r}",
                                message=message)
            return
        session = self._session(connection)
        if session.broken:
            return  # the rest of a socket being dropped after a gap
        numbered = "sequence_num" in message
        if message.get("type") == "error":
            # Not known to be numbered; if it is, it counts like any message.
            if not numbered or self._in_sequence(connection, session, message):
                self._error(connection, message)
            return
        channel = message.get("channel")
        if not isinstance(channel, str):
            self.context.reject("unexpected", "coinbase: unexpected message {message!r}",
                                message=message)
            return
        if channel not in CHANNELS and not numbered:
            self.context.problem(("channel", channel), "coinbase: ignoring channel {channel!r}",
                                 channel=channel)
            return
        if not self._in_sequence(connection, session, message):
            return
        if channel == "l2_data":
            self._level2(connection, session, message.get("events"), arrival)
        elif channel == "heartbeats":
            session.last_heartbeat = self.context.reactor.seconds()
        elif channel == "subscriptions":
            self._acknowledged(connection, message.get("events"))
        else:
            # "Clients are expected to ignore messages they do not support" (§5.2).
            self.context.problem(("channel", channel), "coinbase: ignoring channel {channel!r}",
                                 channel=channel)

    def _level2(self, connection: Connection, session: Session, events: Any,
                arrival: float) -> None:
        if type(events) is not list or not all(
            type(event) is dict and type(event.get("product_id")) is str for event in events
        ):
            # A message that cannot say whose book it changed: any of them may be wrong now.
            self.context.reject("bad_data", "coinbase: unreadable l2_data events {events!r}",
                                events=events)
            self._resync_connection(connection, session, "unreadable l2_data message", "bad_data")
            return
        for event in events:
            symbol = self.context.symbol_of(event["product_id"])
            sync = self.syncs.get(symbol) if symbol is not None else None
            if sync is None:
                continue  # not (or no longer) watched
            if connection is sync.connection:
                successor = False
            elif self.context.predecessor(connection) is sync.connection:
                successor = True
            else:
                continue  # an old connection's, after the product moved on
            kind = event.get("type")
            try:
                bids, asks = parse_updates(event.get("updates"))
            except InvalidLevel as error:
                if not successor:
                    sync.rejected(str(kind), error)
                continue
            if kind == "snapshot":
                self._replies.answered(connection, sync.symbol)
                sync.snapshot(connection, bids, asks, arrival)
            elif kind == "update":
                if not successor:
                    sync.update(bids, asks, arrival)
            elif not successor:
                sync.rejected("event", InvalidLevel(f"unknown event type {kind!r}"))

    def _acknowledged(self, connection: Connection, events: Any) -> None:
        """The connection's subscriptions, all of them (not only the newest)."""
        products: set[str] = set()
        for event in events if type(events) is list else ():
            subscriptions = event.get("subscriptions") if type(event) is dict else None
            listed = subscriptions.get(BOOK_CHANNEL) if type(subscriptions) is dict else None
            if type(listed) is list:
                products.update(p for p in listed if type(p) is str)
        for product in products:
            symbol = self.context.symbol_of(product)
            sync = self.syncs.get(symbol) if symbol is not None else None
            if sync is not None and (
                sync.connection is connection
                or self.context.predecessor(connection) is sync.connection
            ):
                sync.subscribed()

    def _error(self, connection: Connection, message: dict[str, Any]) -> None:
        error = message.get("message")
        self.context.reject("error_reply", "coinbase: {connection}: error {error!r}",
                            connection=connection.label, error=error)
        # The error names no subscription: every product still waiting for its
        # snapshot on this connection subscribes again, later (a duplicate
        # subscription is harmless).
        for symbol in map(str, self._replies.waiting(connection)):
            self._replies.answered(connection, symbol)
            sync = self.syncs.get(symbol)
            if sync is not None:
                metrics.SUBSCRIBE_RETRIES.labels(self.name, "refused").inc()
                sync.subscribe_refused(connection, error)
