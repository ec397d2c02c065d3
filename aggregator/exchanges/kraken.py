"""Kraken spot, websocket v2 `book` channel: a snapshot on subscribe, then
updates, every message carrying a CRC32 checksum of the top 10 levels.

Why this channel: it is Kraken's only public L2 book feed, and its checksum
is what makes it trustworthy. Updates carry no sequence number, so a lost
or mangled update can only be seen through the checksum: it is verified on
every message, before the book is committed. A mismatch (or a crossed book,
or a bad number) withdraws the book and restarts the subscription
(unsubscribe + subscribe), which brings a fresh snapshot: Kraken has no REST
snapshot matching the stream, and the v2 `book` channel re-sends one only on
a new subscription. Facts and sources: docs/PROTOCOLS.md §5.3.

Prices and sizes arrive as JSON numbers and are parsed to floats (orjson);
the checksum text is rebuilt from them at the pair's precision (AssetPairs
`pair_decimals` / `lot_decimals`). That is exact for numbers of up to 15
significant digits; a longer one could only cause a false mismatch, i.e. a
needless resync, never a wrong book.
"""

from __future__ import annotations

import enum
import zlib
from typing import Any, Iterable, Sequence

import orjson
from twisted.logger import Logger

from aggregator import metrics
from aggregator.book import BookState, ExchangeBook, InvalidLevel, Level, OrderBook, parse_number
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.venue import FeedContext, PendingReplies, VenueSettings
from aggregator.instruments import Instrument, canonical_asset

SETTINGS = VenueSettings(
    # Kraken publishes no per-connection frame limit for public v2 requests;
    # stay well below what its docs call abusive.
    frames_per_second=10.0,
    auto_ping_interval=30.0,
    auto_ping_timeout=10.0,
    # A heartbeat arrives about once a second while anything is subscribed;
    # with nothing subscribed, idle_probe's ping (after 10 s) gets a pong.
    inactivity_timeout=20.0,
    max_symbols_per_connection=200,
    symbols_per_frame=20,
    rest_weight_per_minute=60.0,
)
# The depths the book channel accepts (§5.3).
DEPTHS = (10, 25, 100, 500, 1000)
# Levels per side the checksum covers, whatever the subscribed depth.
CHECKSUM_LEVELS = 10


def subscription_depth(served: int) -> int:
    """The smallest depth Kraken accepts that covers `served` levels."""
    for depth in DEPTHS:
        if depth >= served:
            return depth
    return DEPTHS[-1]


# -- the checksum (docs/PROTOCOLS.md §5.3) --------------------------------------


def checksum_field(text: str) -> str:
    """"45285.2" → "452852", "0.00100000" → "100000"."""
    return text.replace(".", "").lstrip("0")


def book_checksum(
    asks: Iterable[tuple[str, str]], bids: Iterable[tuple[str, str]]
) -> int:
    """CRC32 of the top asks (best first) then the top bids (best first),
    each level its price and size text as the venue writes them."""
    parts = [
        checksum_field(price) + checksum_field(size)
        for side in (asks, bids)
        for price, size in side
    ]
    return zlib.crc32("".join(parts).encode("ascii"))


def order_book_checksum(book: OrderBook, instrument: Instrument) -> int:
    """book_checksum of the book's top levels, their text rebuilt at the
    pair's precision.

    A field is the number's digits without the point and leading zeros: for
    a number of at most `decimals` decimals that is the integer
    number × 10**decimals, which round() finds exactly for numbers of up to
    15 significant digits (the error of a double times a power of ten stays
    far below one half) — a fifth of the cost of formatting and stripping
    40 strings per message.
    """
    price_scale = 10 ** (instrument.price_decimals or 0)
    size_scale = 10 ** (instrument.size_decimals or 0)
    fields = [
        f"{round(price * price_scale)}{round(size * size_scale)}"
        for side in (book.top_asks(CHECKSUM_LEVELS), book.top_bids(CHECKSUM_LEVELS))
        for price, size in side
    ]
    return zlib.crc32("".join(fields).encode("ascii"))


def parse_side(raw: object) -> list[Level]:
    """[{"price": p, "qty": q}, ...] → [(p, q), ...]; InvalidLevel otherwise."""
    if type(raw) is not list:
        raise InvalidLevel(f"levels must be a list, not {type(raw).__name__}")
    levels = []
    for entry in raw:
        if type(entry) is not dict or "price" not in entry or "qty" not in entry:
            raise InvalidLevel(f"a level must be {{price, qty}}: {entry!r}")
        levels.append((parse_number(entry["price"]), parse_number(entry["qty"])))
    return levels


def truncate(book: OrderBook, depth: int) -> None:
    """Drop the levels past `depth` per side: Kraken sends no delete for a
    level an insertion pushed out of the subscribed depth."""
    bids, asks = book.depth()
    if bids > depth or asks > depth:
        book.apply(
            [(price, 0.0) for price, _ in book.top_bids(bids)[depth:]],
            [(price, 0.0) for price, _ in book.top_asks(asks)[depth:]],
        )


def apply_message(
    book: OrderBook, kind: str, data: dict[str, Any], depth: int, instrument: Instrument
) -> str | None:
    """One book message applied to `book` and checked; None if the result
    is right, else why not (the book is then unusable). Raises InvalidLevel
    (or KeyError/TypeError) for a malformed message."""
    bids = parse_side(data.get("bids", []))
    asks = parse_side(data.get("asks", []))
    expected = data["checksum"]
    if type(expected) is not int:
        raise InvalidLevel(f"checksum {expected!r} is not an integer")
    if kind == "snapshot":
        book.replace(bids, asks)
    else:
        book.apply(bids, asks)
    truncate(book, depth)
    if book.is_crossed():
        return "crossed"
    actual = order_book_checksum(book, instrument)
    if actual != expected:
        return f"checksum {actual} != {expected}"
    return None


class SyncState(enum.Enum):
    AWAITING_ACK = "awaiting-ack"  # subscribe sent (maybe after an unsubscribe)
    AWAITING_SNAPSHOT = "awaiting-snapshot"  # acknowledged; the snapshot follows
    LIVE = "live"  # snapshot and every update since applied, checksums matching


class BookSync:
    """One pair's book from the `book` channel.

    AWAITING_ACK → (subscribe acknowledged, by either connection of a
    handover) → AWAITING_SNAPSHOT → (snapshot, checksum right) → LIVE; a
    checksum mismatch, crossed book or bad message → withdrawn, unsubscribe +
    subscribe → AWAITING_ACK. While a successor connection is being brought
    up, its own stream is kept in a shadow book (checksummed the same way),
    which becomes the book at handover.
    """

    log = Logger()

    def __init__(
        self, context: FeedContext, book: ExchangeBook, connection: Connection, depth: int
    ) -> None:
        self.context = context
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.depth = depth
        self.instrument = context.instrument(book.symbol)
        self.state = SyncState.AWAITING_ACK
        self.restarts = 0  # subscription restarts since the book was last live long enough
        self.live_since: float | None = None
        self.subscribe_attempts = 0
        # The successor connection's stream during a handover: its book, and
        # whether it holds a verified snapshot.
        self.shadow = OrderBook()
        self.shadow_synced = False

    def _set_state(self, state: SyncState, reason: str) -> None:
        if state is not self.state:
            self.log.debug("kraken {symbol}: sync {old} -> {new} ({reason})", symbol=self.symbol,
                           old=self.state.value, new=state.value, reason=reason)
            self.state = state

    # -- inputs -----------------------------------------------------------------

    def subscribed(self) -> None:
        self.subscribe_attempts = 0
        if self.state is SyncState.AWAITING_ACK:
            self._set_state(SyncState.AWAITING_SNAPSHOT, "subscribed")

    def subscribe_refused(self, connection: Connection, error: object) -> None:
        delay = self.context.retry_delay(self.subscribe_attempts)
        self.subscribe_attempts += 1
        if connection is self.connection:
            self.book.mark_syncing(f"subscription refused ({error}); retrying in {delay:.1f}s")
            self._set_state(SyncState.AWAITING_ACK, "subscription refused")
        # Unsubscribed first: Kraken refuses a pair the connection already has.
        connection.send(unsubscribe_message([self.instrument.native], self.depth))
        self.context.resubscribe(connection, [self.symbol], delay)

    def message(self, kind: str, data: dict[str, Any], arrival: float) -> None:
        """A book message from the sync's own connection."""
        if kind == "update" and self.state is not SyncState.LIVE:
            return  # the old subscription's tail, before the new snapshot
        if kind == "snapshot" and self.state is SyncState.AWAITING_ACK:
            return  # the old subscription's (a new one is on its way)
        try:
            problem = apply_message(self.book.book, kind, data, self.depth, self.instrument)
        except (KeyError, TypeError, ValueError) as error:  # InvalidLevel is a ValueError
            self.context.reject(
                "bad_number" if isinstance(error, InvalidLevel) else "bad_data",
                "kraken {symbol}: rejected {kind}: {error}",
                symbol=self.symbol, kind=kind, error=error,
            )
            self.resync(f"rejected {kind}: {error}", "bad_data")
            return
        if problem == "crossed":
            metrics.CROSSED.labels("kraken").inc()
            self.resync("book crossed: our copy is out of sync", "crossed")
        elif problem is not None:
            self.resync(f"{kind}: {problem}", "checksum")
        elif kind == "snapshot":
            self._set_state(SyncState.LIVE, "snapshot")
            self.live_since = self.context.reactor.seconds()
            self.book.go_live(arrival)
        else:
            self.book.commit(arrival)

    def successor_subscribed(self) -> None:
        """The connection taking over acknowledged: its snapshot comes next."""
        self.shadow_synced = False
        self.shadow.clear()

    def successor_message(self, kind: str, data: dict[str, Any]) -> None:
        """A book message from the connection taking over (kept aside until handover)."""
        if kind == "update" and not self.shadow_synced:
            return
        try:
            problem = apply_message(self.shadow, kind, data, self.depth, self.instrument)
        except (KeyError, TypeError, ValueError):
            problem = "malformed"
        self.shadow_synced = problem is None
        if problem is not None:
            self.shadow.clear()

    def adopt(self, connection: Connection) -> None:
        """Handover done: `connection`'s stream (the shadow book) is ours now."""
        self.connection = connection
        synced, self.shadow_synced = self.shadow_synced, False
        shadow, self.shadow = self.shadow, OrderBook()
        if not synced:
            # The successor's snapshot is not (or not rightly) in, and the old
            # stream is gone: withhold the book and start over there.
            reason = "handover before the new connection's snapshot"
            self.book.mark_syncing(reason)
            self.restart(reason)
            return
        bids, asks = shadow.depth()
        self.book.book.replace(shadow.top_bids(bids), shadow.top_asks(asks))
        self.subscribe_attempts = 0
        if self.state is SyncState.LIVE:
            self.book.commit(None)
        else:
            self._set_state(SyncState.LIVE, "handover")
            self.live_since = self.context.reactor.seconds()
            self.book.go_live(None)

    # -- actions ----------------------------------------------------------------

    def resync(self, reason: str, cause: str) -> None:
        self.log.warn("kraken {symbol}: resync ({reason})", symbol=self.symbol, reason=reason)
        metrics.RESYNCS.labels("kraken", cause).inc()
        self.book.withdraw(BookState.STALE, reason)
        self.restart(reason)

    def restart(self, reason: str) -> None:
        """Unsubscribe and subscribe again: the only way to a fresh snapshot."""
        now = self.context.reactor.seconds()
        if self.live_since is not None and now - self.live_since >= SETTINGS.healthy_period:
            self.restarts = 0
        self.live_since = None
        # Back-to-back restarts (a persistent mismatch) back off.
        delay = self.context.retry_delay(self.restarts - 1) if self.restarts else 0.0
        self.restarts += 1
        self._set_state(SyncState.AWAITING_ACK, reason)
        self.connection.send(unsubscribe_message([self.instrument.native], self.depth))
        self.context.resubscribe(self.connection, [self.symbol], delay)


def unsubscribe_message(natives: list[str], depth: int) -> dict[str, Any]:
    return {"method": "unsubscribe",
            "params": {"channel": "book", "symbol": natives, "depth": depth}}


class KrakenAdapter:
    """Kraken's v2 wire protocol: subscriptions by req_id (one ack per pair),
    book messages routed to each pair's BookSync."""

    name = "kraken"
    settings = SETTINGS
    symbol_list_weight = 1.0
    default_ws_url = "wss://ws.kraken.com/v2"
    default_rest_url = "https://api.kraken.com"
    ws_url_help = "Kraken websocket v2 URL (used as is)."
    rest_url_help = "Kraken REST base; /0/public/AssetPairs is appended."
    log = Logger()

    def __init__(self, context: FeedContext) -> None:
        self.context = context
        self.syncs: dict[str, BookSync] = {}
        self._next_id = 1
        # (connection, (req_id, symbol)) → until acknowledged.
        self._replies = PendingReplies(
            context.reactor, self.settings.reply_timeout, context.subscription_unanswered
        )

    # -- symbol list ------------------------------------------------------------

    # Every frame is decoded whole.
    decode = staticmethod(orjson.loads)

    def connection_url(self, ws_url: str) -> str:
        return ws_url

    def symbol_list_path(self) -> str:
        return "/0/public/AssetPairs"

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        errors = document.get("error")
        if errors:
            raise ValueError(f"AssetPairs answered errors {errors!r}")
        instruments = []
        for entry in document["result"].values():
            wsname = entry.get("wsname")
            if not wsname or entry.get("status", "online") != "online":
                continue  # no websocket book (e.g. dark-pool pairs), or not trading
            base, slash, quote = wsname.partition("/")
            if not slash:
                raise ValueError(f"wsname {wsname!r} is not BASE/QUOTE")
            base, quote = canonical_asset(base), canonical_asset(quote)
            # v2 names pairs like v1's wsname but with the aliases resolved
            # ("XBT/USD" → "BTC/USD"; docs/PROTOCOLS.md §5.3).
            instruments.append(Instrument(
                f"{base}/{quote}", base, quote,
                int(entry["pair_decimals"]), int(entry["lot_decimals"]),
            ))
        return instruments

    # -- subscriptions -----------------------------------------------------------

    def _depth(self, symbols: Sequence[str]) -> int:
        served = [self.context.books[s].depth for s in symbols if s in self.context.books]
        return subscription_depth(max(served, default=CHECKSUM_LEVELS))

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        request_id = self._request_id()
        depth = self._depth(symbols)
        for symbol in symbols:
            self._replies.expect(connection, (request_id, symbol), [symbol])
            sync = self.syncs.get(symbol)
            if sync is not None and connection is sync.connection:
                sync.depth = depth
        natives = [self.context.instrument(s).native for s in symbols]
        return {"method": "subscribe",
                "params": {"channel": "book", "symbol": natives, "depth": depth},
                "req_id": request_id}

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        for key in self._replies.waiting(connection):
            if isinstance(key, tuple) and key[1] in symbols:
                self._replies.answered(connection, key)
        message = unsubscribe_message(
            [self.context.instrument(s).native for s in symbols], self._depth(symbols)
        )
        message["req_id"] = self._request_id()
        return message

    def _request_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id


    # -- syncs ---------------------------------------------------------------------

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        sync = self.syncs[book.symbol] = BookSync(
            self.context, book, connection, self._depth([book.symbol])
        )
        if subscribed:
            # Streaming already, but its snapshot is long gone (and updates
            # were not followed meanwhile): withhold the book, get a new one.
            reason = "still subscribed; a new snapshot is needed"
            book.mark_syncing(reason)
            sync.restart(reason)

    def synced_on(self, symbol: str) -> Connection | None:
        sync = self.syncs.get(symbol)
        return sync.connection if sync is not None else None

    def stop_sync(self, symbol: str) -> None:
        self.syncs.pop(symbol, None)

    def connection_reset(self, connection: Connection) -> None:
        self._replies.forget(connection)

    def handover(self, old: Connection, new: Connection) -> None:
        for sync in list(self.syncs.values()):
            if sync.connection is old:
                sync.adopt(new)

    def idle_probe(self, connection: Connection) -> None:
        connection.send({"method": "ping", "req_id": self._request_id()})

    def stop(self) -> None:
        self._replies.clear()

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        if not isinstance(message, dict):
            self.context.reject("unexpected", "kraken: unexpected message {message!r}",
                                message=message)
            return
        channel = message.get("channel")
        if channel == "book":
            self._book(connection, message, arrival)
        elif channel in ("heartbeat", "status"):
            pass
        elif message.get("method") == "subscribe":
            self._subscribe_reply(connection, message)
        elif message.get("method") in ("unsubscribe", "pong"):
            pass  # an unsubscribe refused means there was nothing to unsubscribe
        else:
            self.context.reject("unexpected", "kraken: unexpected message {message!r}",
                                message=message)

    def _book(self, connection: Connection, message: dict[str, Any], arrival: float) -> None:
        kind = message.get("type")
        data = message.get("data")
        if kind not in ("snapshot", "update") or type(data) is not list:
            self.context.reject("bad_data", "kraken: malformed book message {message!r}",
                                message=message)
            return
        for entry in data:
            native = entry.get("symbol") if isinstance(entry, dict) else None
            symbol = self.context.symbol_of(native) if isinstance(native, str) else None
            sync = self.syncs.get(symbol) if symbol is not None else None
            if sync is None or not isinstance(entry, dict):
                continue  # not (or no longer) watched
            if connection is sync.connection:
                sync.message(str(kind), entry, arrival)
            elif self.context.predecessor(connection) is sync.connection:
                sync.successor_message(str(kind), entry)

    def _subscribe_reply(self, connection: Connection, message: dict[str, Any]) -> None:
        request_id = message.get("req_id")
        result = message.get("result")
        native = result.get("symbol") if isinstance(result, dict) else message.get("symbol")
        symbol = self.context.symbol_of(native) if isinstance(native, str) else None
        if symbol is not None:
            symbols = [symbol] if self._replies.answered(connection, (request_id, symbol)) else []
        else:
            # An error naming no pair: every pair of that request is refused.
            symbols = []
            for key in self._replies.waiting(connection):
                if isinstance(key, tuple) and key[0] == request_id:
                    symbols += self._replies.answered(connection, key)
        if message.get("success") is not True:
            error = message.get("error")
            self.context.reject("error_reply", "kraken: subscribing {symbols} refused: {error}",
                                symbols=symbols or native, error=error)
            for refused in symbols:
                sync = self.syncs.get(refused)
                if sync is not None:
                    metrics.SUBSCRIBE_RETRIES.labels(self.name, "refused").inc()
                    sync.subscribe_refused(connection, error)
            return
        for acknowledged in symbols:
            sync = self.syncs.get(acknowledged)
            if sync is None:
                continue
            # During a handover the successor subscribes too: its snapshot
            # (next) starts the shadow book, not the one clients see.
            if connection is sync.connection:
                sync.subscribed()
            elif self.context.predecessor(connection) is sync.connection:
                sync.successor_subscribed()
