"""Bitstamp: `order_book_<pair>` channel (full top 100 on every change),
seeded and periodically verified by REST snapshots, ordered by microtimestamp.

Why not `diff_order_book_`: Bitstamp diffs carry no sequence number and no
checksum, so a lost diff can never be detected and the book would drift
silently. Every `order_book_` message is the whole top 100: a lost message
costs nothing, the next one heals the book. But a quiet pair may stay silent
for 30 s and more, hence the REST snapshot once the subscription is
acknowledged; and since a channel that silently stopped would look exactly
like a quiet pair, each book is also compared with a fresh REST snapshot
every few minutes. Facts: docs/PROTOCOLS.md §2.
"""

from __future__ import annotations

import enum
import re
from functools import lru_cache
from typing import Any, Iterable

import orjson
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from aggregator import metrics
from aggregator.book import BookState, ExchangeBook, InvalidLevel, Level, parse_levels
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.venue import FeedContext, PendingReplies, VenueSettings
from aggregator.instruments import Instrument, canonical_asset

CHANNEL_PREFIX = "order_book_"
# Levels compared per side when verifying against REST (the channel's depth).
VERIFY_DEPTH = 100
# A message stamped further ahead of our clock than this is not believed:
# accepted, it would make every later (true) message look older and freeze
# the book. Generous: it only has to exceed clock skew plus transit.
MAX_FUTURE_US = 60_000_000

SETTINGS = VenueSettings(
    frames_per_second=50.0,
    auto_ping_interval=20.0,
    auto_ping_timeout=10.0,
    # Heartbeats are sent after half of this without any frame; a live
    # connection answers them, so this much silence means a dead one.
    inactivity_timeout=30.0,
    max_symbols_per_connection=1000,
    # One channel per bts:subscribe frame.
    symbols_per_frame=1,
    # Documented: 8000-10000 requests per 10 minutes per client.
    rest_weight_per_minute=400.0,
)


class BookFrame:
    """An `order_book_` data frame read only as far as a book needs it.

    Every such frame is a whole top 100 a side, about 8 KB; a book serves
    the first few levels. Decoding it all cost more than the rest of the
    path together, so `read` finds the frame's parts in its bytes
    (Bitstamp's compact JSON in its documented key order, PROTOCOLS.md
    §2.3) and `served` reads just the first levels of each side, checking
    their text against the decimal grammar as it goes (one regular
    expression: no Python step per level). The deeper levels are decoded
    only when the periodic verification compares them. A frame of any other
    shape is decoded whole: by `decode` (another layout), or by the sync
    (served levels the expression cannot vouch for: a bad number, say,
    which the full decoding then names).
    """

    __slots__ = ("payload", "microtimestamp", "_bids", "_asks")

    _HEAD = b'{"data":{"timestamp":"'
    _STAMP = b'","microtimestamp":"'
    _BIDS = b'","bids":['
    _ASKS = b'],"asks":['
    _CHANNEL = b']},"channel":"'
    _TAIL = b'","event":"data"}'

    def __init__(self, payload: bytes, microtimestamp: int, bids: int, asks: int) -> None:
        self.payload = payload
        self.microtimestamp = microtimestamp
        # Where each side's list opens ("[").
        self._bids = bids
        self._asks = asks

    @classmethod
    def read(cls, payload: bytes) -> tuple[str, BookFrame] | None:
        """(channel, frame), or None if the payload is not an `order_book_`
        data frame of the usual shape."""
        if not (payload.startswith(cls._HEAD) and payload.endswith(cls._TAIL)):
            return None
        stamp = payload.find(cls._STAMP, len(cls._HEAD))
        bids = payload.find(cls._BIDS, stamp)
        if stamp < 0 or bids < 0:
            return None
        micros = payload[stamp + len(cls._STAMP):bids]
        if not (micros.isdigit() and payload[len(cls._HEAD):stamp].isdigit()):
            return None
        asks = payload.find(cls._ASKS, bids)
        channel = payload.rfind(cls._CHANNEL)
        if asks < 0 or channel < asks:
            return None
        name = payload[channel + len(cls._CHANNEL):-len(cls._TAIL)]
        # Channel names are [a-z0-9_]: a quote here means another shape.
        if not name.isascii() or b'"' in name:
            return None
        frame = cls(payload, int(micros), bids + len(cls._BIDS) - 1, asks + len(cls._ASKS) - 1)
        return name.decode("ascii"), frame

    def served(self, count: int) -> tuple[bytes, bytes] | None:
        """The first `count` levels of each side as text (for comparing with
        the previous frame's, and for top_levels), or None unless every one
        is a well-formed ["price","amount"] pair of decimal text."""
        first = _first_levels(count)
        payload = self.payload
        sides = []
        for start in (self._bids, self._asks):
            match = first.match(payload, start)
            if match is None:
                return None
            text = match.group()
            after = payload[match.end()]
            # The side ends here ("]"), or goes on past `count` levels (","):
            # anything else is a level the expression refused.
            if after != 0x5D and (after != 0x2C or text.count(b"[") - 1 != count):
                return None
            sides.append(text)
        return sides[0], sides[1]

    def top_levels(self, served: tuple[Any, Any]) -> tuple[list[Level], list[Level]]:
        """`served` (checked text) → levels."""
        return _text_levels(served[0]), _text_levels(served[1])

    def whole(self) -> DecodedBook:
        """The frame decoded whole: KeyError, TypeError or ValueError if it is
        not JSON or no book."""
        return DecodedBook(orjson.loads(self.payload)["data"])

    def all_levels(self) -> tuple[list[Level], list[Level]]:
        return self.whole().all_levels()

    def levels(self) -> tuple[list[Any], list[Any]]:
        return self.whole().levels()

    def verified_part(self) -> BookFrame:
        # Kept as the frame's bytes (a tenth of the memory of its decoded
        # levels), decoded only when verified.
        return self


# A level of an order_book_ frame as Bitstamp sends it: both numbers decimal
# text, with or without a fraction ("2034.50", "43000", "0.00000000").
# Anything else (an exponent, a number not in quotes) is read by the full
# decoding and aggregator.book's grammar instead.
_LEVEL = rb'\["[0-9]+(?:\.[0-9]+)?","[0-9]+(?:\.[0-9]+)?"\]'


@lru_cache(maxsize=8)
def _first_levels(count: int) -> re.Pattern[bytes]:
    """Matches, from a side's "[", up to `count` well-formed levels."""
    if count <= 0:
        return re.compile(rb"\[")
    return re.compile(rb"\[(?:" + _LEVEL + rb"(?:," + _LEVEL + rb"){0,%d})?" % (count - 1))


def _text_levels(text: bytes) -> list[Level]:
    # Checked text turned into a JSON array of numbers, each given an
    # exponent so that it reads as a float ("43000" would be an int):
    # orjson converts them all in one call, five times faster than float()
    # per number and the same doubles (both round correctly). A leading zero
    # ("0100.5") is not JSON, nor is a number beyond a double: JSONDecodeError,
    # and the sync decodes the frame whole. The pairs are lists: the book only
    # unpacks them.
    numbers = text.replace(b'",', b"e0,").replace(b'"]', b"e0]").translate(None, b'"')
    levels: list[Level] = orjson.loads(numbers + b"]")
    return levels


class DecodedBook:
    """A whole book already decoded: a REST snapshot, or a frame BookFrame
    did not read. The reading interface of BookFrame."""

    __slots__ = ("microtimestamp", "bids", "asks")

    def __init__(self, data: Any) -> None:
        """KeyError, TypeError or ValueError (InvalidLevel) if `data` is no book."""
        when = data["microtimestamp"]
        when = int(when) if type(when) in (str, int) else when
        if type(when) is not int:
            raise InvalidLevel(f"microtimestamp {when!r} is not an integer")
        self.microtimestamp: int = when
        self.bids, self.asks = data["bids"], data["asks"]
        if type(self.bids) is not list or type(self.asks) is not list:
            raise InvalidLevel("bids and asks must be lists")

    def whole(self) -> DecodedBook:
        return self

    def served(self, count: int) -> tuple[list[Any], list[Any]]:
        return self.bids[:count], self.asks[:count]

    def top_levels(self, served: tuple[Any, Any]) -> tuple[list[Level], list[Level]]:
        return parse_levels(served[0]), parse_levels(served[1])

    def all_levels(self) -> tuple[list[Level], list[Level]]:
        return parse_levels(self.bids), parse_levels(self.asks)

    def levels(self) -> tuple[list[Any], list[Any]]:
        return self.bids, self.asks

    def verified_part(self) -> DecodedBook:
        # A REST snapshot holds thousands of levels: only its top is kept.
        if len(self.bids) > VERIFY_DEPTH or len(self.asks) > VERIFY_DEPTH:
            part = DecodedBook.__new__(DecodedBook)
            part.microtimestamp = self.microtimestamp
            part.bids, part.asks = self.bids[:VERIFY_DEPTH], self.asks[:VERIFY_DEPTH]
            return part
        return self


class SyncState(enum.Enum):
    AWAITING_ACK = "awaiting-ack"  # bts:subscribe sent
    SEEDING = "seeding"  # acknowledged; REST snapshot in flight (the stream may beat it)
    LIVE = "live"  # holds the newest full book seen
    RESYNCING = "resyncing"  # withdrawn; a fresh snapshot (or the next message) heals it


class BookSync:
    """One pair's book: whole books, newest microtimestamp wins.

    AWAITING_ACK → (subscription acknowledged, by either connection of a
    handover) → SEEDING → (a snapshot or a stream message) → LIVE; a bad
    message, a timestamp from the future or a failed verification →
    RESYNCING → (snapshot or message) → LIVE.
    """

    log = Logger()

    def __init__(
        self, context: FeedContext, book: ExchangeBook, connection: Connection
    ) -> None:
        self.context = context
        self.book = book
        self.symbol = book.symbol
        self.connection = connection
        self.state = SyncState.AWAITING_ACK
        self.held_time = 0  # microtimestamp of the levels the book holds (0: none)
        self.request: Any = None
        self.request_purpose = ""
        self.verified_at = 0.0
        # The levels of the message the book holds, as text: those served
        # (and one more), compared with the next message's; and the message,
        # for the part the verification compares (VERIFY_DEPTH a side).
        self.shown: tuple[Any, Any] | None = None
        self.held: BookFrame | DecodedBook | None = None
        self.subscribe_attempts = 0
        self.crossed = False

    def _set_state(self, state: SyncState, reason: str) -> None:
        if state is not self.state:
            self.log.debug("bitstamp {symbol}: sync {old} -> {new} ({reason})", symbol=self.symbol,
                           old=self.state.value, new=state.value, reason=reason)
            self.state = state

    # -- inputs -----------------------------------------------------------------

    def subscribed(self) -> None:
        self.subscribe_attempts = 0
        if self.state is SyncState.AWAITING_ACK:
            # Seeded only now: a snapshot taken before the channel started
            # could miss a change made in between, and a quiet pair might not
            # change again for a long time.
            self._set_state(SyncState.SEEDING, "subscribed")
            self.fetch("snapshot")

    def subscribe_refused(self, connection: Connection, error: object) -> None:
        delay = self.context.retry_delay(self.subscribe_attempts)
        self.subscribe_attempts += 1
        if connection is self.connection and self.state is SyncState.AWAITING_ACK:
            self.book.mark_syncing(f"subscription refused ({error}); retrying in {delay:.1f}s")
        self.context.resubscribe(connection, [self.symbol], delay)

    def message(self, data: Any, arrival: float | None, source: str) -> None:
        """A whole book: a stream frame (a BookFrame, or decoded if it had
        another shape) or a REST snapshot (decoded).

        Only the served depth is parsed (a message is 100 levels a side, a
        REST snapshot thousands): what lies deeper is kept for the periodic
        verification, and a message whose served levels are, as text, those
        of the book's message is not parsed at all.
        """
        book: BookFrame | DecodedBook
        if type(data) is BookFrame:
            book = data
        else:
            try:
                book = DecodedBook(data)
            except (KeyError, TypeError, ValueError) as error:
                self._reject(source, error)
                return
        when = book.microtimestamp
        if when <= self.held_time:
            return  # older than what the book shows (e.g. a lagging snapshot)
        now_us = int(self.context.reactor.seconds() * 1_000_000)
        if when > now_us + MAX_FUTURE_US:
            self.context.reject(
                "bad_timestamp", "bitstamp {symbol}: {source} message stamped {ahead:.0f}s "
                "in the future; resyncing", symbol=self.symbol, source=source,
                ahead=(when - now_us) / 1e6,
            )
            self.resync(f"{source} message stamped in the future", "bad_data")
            return
        # The served levels plus one: the one beyond shows the cut is sound.
        cut = self.book.depth + 1
        served = book.served(cut)
        if served is None:
            # Levels the frame reader cannot vouch for: decoded whole, the
            # fault (if any) is named.
            try:
                book = book.whole()
            except (KeyError, TypeError, ValueError) as error:
                self._reject(source, error)
                return
            served = book.served(cut)
        if served == self.shown and self.book.live:
            # The same text: the same levels. Newer, though, and deeper
            # levels may differ: what the verification compares.
            self.held_time = when
            self.held = book.verified_part()
            return
        shown: tuple[Any, Any] | None = served
        try:
            try:
                bids, asks = book.top_levels(served)
            except orjson.JSONDecodeError:
                # Checked text that is not JSON without its quotes ("007.5",
                # or a number too large for a double): decoded whole, and
                # read (or rejected, naming the level) by aggregator.book.
                book = book.whole()
                bids, asks = book.top_levels(book.served(cut))
            if not (_strictly_best_first(bids, -1.0) and _strictly_best_first(asks, 1.0)):
                # Not the documented order (PROTOCOLS.md §0, §2.3): the
                # top cannot be read off the start, so read everything.
                bids, asks = book.all_levels()
                shown = None  # parse the next message whole too
            self.book.book.replace(bids, asks)
        except (KeyError, TypeError, ValueError) as error:
            self._reject(source, error)
            return
        self.held_time = when
        self.shown = shown
        self.held = book.verified_part()
        self._note_crossing(self.book.book.is_crossed())
        self._set_state(SyncState.LIVE, f"{source} message")
        if self.book.live:
            self.book.commit(arrival)
        else:
            self.book.go_live(arrival)

    def snapshot_answered(self, document: Any, purpose: str) -> None:
        if purpose == "verify":
            self.verification(document)
        else:
            self.message(document, None, "snapshot")

    def snapshot_failed(self, reason: Failure) -> None:
        # Not fatal: the channel's next message is a full book anyway.
        self.context.problem(
            ("snapshot_failed", self.symbol),
            "bitstamp {symbol}: snapshot request failed ({error}); relying on the stream",
            symbol=self.symbol, error=reason.value,
        )

    def verification(self, document: Any) -> None:
        """A fresh REST snapshot to compare the book with."""
        try:
            when = int(document["microtimestamp"])
            bids = _best_first(parse_levels(document["bids"]), reverse=True)[:VERIFY_DEPTH]
            asks = _best_first(parse_levels(document["asks"]), reverse=False)[:VERIFY_DEPTH]
        except (KeyError, TypeError, ValueError):
            return  # a bad verification snapshot proves nothing either way
        if not self.book.live:
            return
        if self.held_time > when + MAX_FUTURE_US:
            # Cannot be (the intake bound), unless the clock jumped: a book
            # "newer" than the exchange by that much is frozen, not fresh.
            self.resync("book stamped ahead of the exchange's own snapshot", "verify_mismatch")
            return
        if when < self.held_time:
            return  # the stream is ahead: nothing to compare at the same moment
        try:
            raw_bids, raw_asks = self.held.levels() if self.held is not None else ([], [])
            held_bids = _best_first(parse_levels(raw_bids), reverse=True)[:VERIFY_DEPTH]
            held_asks = _best_first(parse_levels(raw_asks), reverse=False)[:VERIFY_DEPTH]
        except (KeyError, TypeError, ValueError) as error:
            # A level beyond the served depth was bad: the message was
            # corrupt even if what it served was not.
            self.context.reject("bad_number", "bitstamp {symbol}: held book has a bad "
                                "level ({error})", symbol=self.symbol, error=error)
            self.resync(f"held book has a bad level: {error}", "bad_data")
            return
        if (held_bids[: len(bids)], held_asks[: len(asks)]) == (bids, asks):
            return
        metrics.RESYNCS.labels("bitstamp", "verify_mismatch").inc()
        self.log.warn(
            "bitstamp {symbol}: book differs from a newer REST snapshot ({age:.1f}s newer); "
            "replaced by it", symbol=self.symbol, age=(when - self.held_time) / 1e6,
        )
        self.message(document, None, "verification snapshot")

    def cancel(self) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.cancel()

    # -- actions ----------------------------------------------------------------

    def resync(self, reason: str, cause: str) -> None:
        metrics.RESYNCS.labels("bitstamp", cause).inc()
        self.book.withdraw(BookState.STALE, reason)
        self.held_time = 0
        self._set_state(SyncState.RESYNCING, reason)
        self.fetch("snapshot")

    def fetch(self, purpose: str) -> None:
        self.cancel()
        reactor = self.context.reactor
        # The cache-buster defeats the ~1 s edge cache in front of the endpoint.
        millis = int(reactor.seconds() * 1000)
        request = self.request = self.context.http.get_json(
            f"{self.context.rest_url}/api/v2/order_book/"
            f"{self.context.instrument(self.symbol).native}/?_={millis}"
        )
        self.request_purpose = purpose
        self.verified_at = reactor.seconds()
        metrics.SNAPSHOT_REQUESTS.labels("bitstamp", purpose).inc()
        request.addCallbacks(
            self._answered, self._errored, callbackArgs=(request, purpose), errbackArgs=(request,)
        )

    def _answered(self, document: Any, request: Any, purpose: str) -> None:
        if request is self.request:  # else cancelled or superseded
            self.request = None
            self.snapshot_answered(document, purpose)

    def _errored(self, reason: Failure, request: Any) -> None:
        if request is self.request:
            self.request = None
            self.snapshot_failed(reason)

    def _reject(self, source: str, error: Exception) -> None:
        # The next full message heals the book; until then it is withheld.
        self.context.reject(
            "bad_number" if isinstance(error, InvalidLevel) else "bad_data",
            "bitstamp {symbol}: rejected {source} message: {error}",
            symbol=self.symbol, source=source, error=error,
        )
        self.book.mark_stale(f"rejected {source} message: {error}")
        self.held_time = 0
        self._set_state(SyncState.RESYNCING, f"rejected {source} message")

    def _note_crossing(self, crossed: bool) -> None:
        # Bitstamp's published book does cross briefly: keep it (it is what
        # the exchange shows), count it, log it once per episode.
        if crossed and not self.crossed:
            metrics.CROSSED.labels("bitstamp").inc()
            self.log.info("bitstamp {symbol}: book is crossed (as published)", symbol=self.symbol)
        self.crossed = crossed


class BitstampAdapter:
    """Bitstamp's wire protocol: one channel per pair, acknowledged per channel."""

    name = "bitstamp"
    settings = SETTINGS
    symbol_list_weight = 1.0
    default_ws_url = "wss://ws.bitstamp.net"
    default_rest_url = "https://www.bitstamp.net"
    ws_url_help = "Bitstamp websocket URL (used as is)."
    rest_url_help = "Bitstamp REST base; /api/v2/... is appended."
    # Each watched book is checked against REST about this often.
    verify_interval = 300.0
    log = Logger()

    def __init__(self, context: FeedContext) -> None:
        self.context = context
        self.syncs: dict[str, BookSync] = {}
        self._replies = PendingReplies(
            context.reactor, self.settings.reply_timeout, context.subscription_unanswered
        )
        self._verifier: LoopingCall | None = None

    def connection_url(self, ws_url: str) -> str:
        return ws_url

    def decode(self, payload: bytes) -> Any:
        # An order_book_ frame is read only as far as its book needs
        # (BookFrame); every other frame is decoded whole.
        read = BookFrame.read(payload)
        if read is None:
            return orjson.loads(payload)
        channel, frame = read
        return {"event": "data", "channel": channel, "data": frame}

    def symbol_list_path(self) -> str:
        return "/api/v2/trading-pairs-info/"

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        instruments = []
        for entry in document:
            if entry.get("trading", "Enabled") != "Enabled":
                continue
            base, slash, quote = entry["name"].partition("/")
            if not slash:
                raise ValueError(f"pair name {entry['name']!r} is not BASE/QUOTE")
            instruments.append(
                Instrument(entry["url_symbol"], canonical_asset(base), canonical_asset(quote))
            )
        return instruments

    # -- subscriptions -----------------------------------------------------------

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        (symbol,) = symbols  # settings.symbols_per_frame == 1
        self._replies.expect(connection, symbol, symbols)
        return {"event": "bts:subscribe", "data": {"channel": self._channel(symbol)}}

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        (symbol,) = symbols
        self._replies.answered(connection, symbol)
        return {"event": "bts:unsubscribe", "data": {"channel": self._channel(symbol)}}

    def _channel(self, symbol: str) -> str:
        return CHANNEL_PREFIX + self.context.instrument(symbol).native

    def _symbol_of_channel(self, channel: object) -> str | None:
        if isinstance(channel, str) and channel.startswith(CHANNEL_PREFIX):
            return self.context.symbol_of(channel[len(CHANNEL_PREFIX):])
        return None


    # -- syncs ---------------------------------------------------------------------

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        sync = self.syncs[book.symbol] = BookSync(self.context, book, connection)
        if subscribed:
            sync.subscribed()
        if self._verifier is None:
            self._verifier = LoopingCall(self._verify_next)
            self._verifier.clock = self.context.reactor
            # Ticks often, verifies at most one stale-enough book per tick: spread out.
            self._verifier.start(max(self.verify_interval / 100, 1.0), now=False)

    def synced_on(self, symbol: str) -> Connection | None:
        sync = self.syncs.get(symbol)
        return sync.connection if sync is not None else None

    def stop_sync(self, symbol: str) -> None:
        sync = self.syncs.pop(symbol, None)
        if sync is not None:
            sync.cancel()

    def connection_reset(self, connection: Connection) -> None:
        self._replies.forget(connection)

    def handover(self, old: Connection, new: Connection) -> None:
        for sync in self.syncs.values():
            if sync.connection is old:
                sync.connection = new

    def idle_probe(self, connection: Connection) -> None:
        connection.send({"event": "bts:heartbeat"})

    def stop(self) -> None:
        self._replies.clear()
        if self._verifier is not None and self._verifier.running:
            self._verifier.stop()
        self._verifier = None

    def _verify_next(self) -> None:
        now = self.context.reactor.seconds()
        due = [
            (sync.verified_at, symbol)
            for symbol, sync in self.syncs.items()
            if sync.state is SyncState.LIVE and sync.request is None
            and now - sync.verified_at >= self.verify_interval
        ]
        if due:
            self.syncs[min(due)[1]].fetch("verify")

    # -- messages ---------------------------------------------------------------

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        if not isinstance(message, dict):
            self.context.reject("unexpected", "bitstamp: unexpected message {message!r}",
                                message=message)
            return
        event = message.get("event")
        symbol = self._symbol_of_channel(message.get("channel"))
        sync = self.syncs.get(symbol) if symbol is not None else None
        carries = sync is not None and (
            connection is sync.connection
            or self.context.predecessor(connection) is sync.connection
        )
        if event == "data" and symbol is not None:
            if sync is not None and carries:
                sync.message(message.get("data"), arrival, "stream")
        elif event == "bts:subscription_succeeded" and symbol is not None:
            self._replies.answered(connection, symbol)
            if sync is not None and carries:
                sync.subscribed()
        elif event == "bts:request_reconnect":
            self.context.rotate(connection, "bitstamp asked us to reconnect")
        elif event == "bts:error":
            self._error(connection, message.get("data"))
        elif event in ("bts:unsubscription_succeeded", "bts:heartbeat"):
            pass
        else:
            self.context.reject("unexpected", "bitstamp: unexpected event {event!r}", event=event)

    def _error(self, connection: Connection, data: Any) -> None:
        self.context.reject("error_reply", "bitstamp: error reply {data!r}", data=data)
        # The error names no channel: every subscription this connection
        # still waits for is retried (an unrelated one answered meanwhile is
        # not, and a duplicate subscription is harmless).
        symbol = self._symbol_of_channel(data.get("channel") if isinstance(data, dict) else None)
        waiting = [symbol] if symbol is not None else self._replies.waiting(connection)
        for waiting_symbol in map(str, waiting):
            self._replies.answered(connection, waiting_symbol)
            sync = self.syncs.get(waiting_symbol)
            if sync is not None:
                metrics.SUBSCRIBE_RETRIES.labels(self.name, "refused").inc()
                sync.subscribe_refused(connection, data)


def _strictly_best_first(levels: list[Level], sign: float) -> bool:
    """Whether prices strictly improve towards the front (sign -1 for bids,
    1 for asks) and no amount is zero: the front is then the book's top."""
    for (price, amount), (deeper, _) in zip(levels, levels[1:]):
        if not sign * price < sign * deeper or amount <= 0.0:
            return False
    return not levels or levels[-1][1] > 0.0


def _best_first(levels: list[Level], reverse: bool) -> list[Level]:
    return sorted((level for level in levels if level[1] > 0.0), reverse=reverse)
