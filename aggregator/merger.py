"""The merged book per symbol, the symbol demand, and the fan-out to subscribers.

Feeds drive ExchangeBook handles (aggregator/book.py), which tell the merger
of every committed change; the merger takes that book's top N at once (the
committed levels), and re-merges the top N of the symbol's *live* books from
scratch (never patching a possibly stale merged copy). Only a merged top N
that actually changed is serialized — once — and offered to the symbol's
subscribers, each of which keeps only the latest.

Given a reactor, the re-merge waits for the end of the reactor turn: one
read from a socket often carries several frames of one symbol, and then the
symbol is merged and serialized once for all of them, its latency mark the
earliest frame's arrival. Under light load a turn carries one frame and
nothing waits longer than that turn.

A symbol nobody streams (held by --symbols alone) only notes its books'
changes: it is merged when a stream or current_summary() asks for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from functools import lru_cache, partial
from typing import Any, Callable, Iterable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from aggregator import metrics
from aggregator._proto import orderbook_pb2
from aggregator.book import BookState, ExchangeBook, Level
from aggregator.instruments import Instrument
from aggregator.wire import encode_exchange_states, encode_keyed_summary, encode_summary

MergedLevel = tuple[str, float, float]
"""(exchange, price, amount)."""


class TooManySymbols(RuntimeError):
    """Watching one more symbol would exceed the limit on distinct symbols."""


class UnknownSymbol(LookupError):
    """No enabled exchange lists the symbol."""


class SymbolListsUnavailable(RuntimeError):
    """Some exchanges' symbol lists are not loaded yet, and none loaded lists it."""


class InvalidView(ValueError):
    """A stream asked for an unknown or disabled exchange, or more levels than served."""


class AmbiguousSymbol(InvalidView):
    """Venues list different markets under one canonical symbol (AB/CDEF and
    ABC/DEF are both "abcdef"): merging them would mix two instruments."""


ViewKey = tuple["frozenset[str] | None", int]
"""(the exchanges a stream merges, None for all; its levels per side)."""


class Feed(Protocol):
    """What the merger needs from an exchange feed."""

    name: str

    def listed_symbols(self) -> frozenset[str] | None:
        """Canonical symbols the exchange trades; None until the list is loaded."""

    def instrument(self, symbol: str) -> Instrument:
        """The exchange's market behind a symbol it lists."""

    def when_symbols_loaded(self) -> Deferred[Any]:
        """Fires (with None) once listed_symbols() is not None."""

    def watch(self, book: ExchangeBook) -> None:
        """Start keeping `book` in sync with the exchange."""

    def unwatch(self, symbol: str) -> None:
        """Stop: nobody needs the symbol any more."""


KeyedLevel = tuple[float, float, str]
"""A merged level as its sort key: bids (-price, -amount, exchange), asks
(price, -amount, exchange). Their natural order is the merge order (best
price first; on an equal price the larger amount, then the exchange name),
so merging books is one sort of plain tuples, in C, without a key function;
aggregator/wire.py encodes Summaries straight from them."""

KeyedTop = tuple[list[KeyedLevel], list[KeyedLevel]]


def book_keys(exchange: str, bids: list[Level], asks: list[Level]) -> KeyedTop:
    """One book's best levels (best first) as merge keys."""
    return (
        [(-p, -a, exchange) for p, a in bids],
        [(p, -a, exchange) for p, a in asks],
    )


def merge_keys(tops: list[KeyedTop], depth: int) -> KeyedTop:
    """The merged top `depth` of the books' keyed tops (each sorted already)."""
    if len(tops) == 1:
        bids, asks = tops[0]
        return bids[:depth], asks[:depth]
    bids, asks = [], []
    for book_bids, book_asks in tops:
        bids += book_bids
        asks += book_asks
    # Timsort finds the books' sorted runs and merges them.
    bids.sort()
    asks.sort()
    return bids[:depth], asks[:depth]


def spread_of(bids: list[MergedLevel], asks: list[MergedLevel]) -> float:
    """best ask - best bid; negative when crossed; NaN when a side is empty.

    NaN, not 0: a zero spread is a real market state (locked).
    """
    if not bids or not asks:
        return math.nan
    return asks[0][1] - bids[0][1]


ExchangeStatus = tuple[str, BookState, str]
"""(exchange, book state, reason)."""

_WIRE_STATES = {
    BookState.SYNCING: orderbook_pb2.ExchangeState.SYNCING,
    BookState.LIVE: orderbook_pb2.ExchangeState.LIVE,
    BookState.STALE: orderbook_pb2.ExchangeState.STALE,
}


def serialize_summary(
    bids: list[MergedLevel],
    asks: list[MergedLevel],
    exchanges: Iterable[ExchangeStatus] = (),
    timestamp_us: int = 0,
) -> bytes:
    return encode_summary(
        spread_of(bids, asks),
        bids,
        asks,
        [(name, _WIRE_STATES[state], reason) for name, state, reason in exchanges],
        timestamp_us,
    )


@lru_cache(maxsize=1024)
def _encoded_states(shown: tuple[ExchangeStatus, ...]) -> bytes:
    # Most Summaries of a symbol show the same states: encoded once.
    return encode_exchange_states(
        tuple((name, _WIRE_STATES[state], reason) for name, state, reason in shown)
    )


def _wall_clock_us() -> int:
    # For clients (the Summary's timestamp_us), so the wall clock, not the reactor's.
    return time.time_ns() // 1000


class Subscription:
    """One client's stream of one symbol's view: a single slot, latest Summary wins.

    However slow the client, it holds at most one pending Summary: a newer one
    overwrites it (conflation), so memory per client is constant and a slow
    reader never delays the others.
    """

    def __init__(
        self, symbol: str, release: Callable[[Subscription], None], view: ViewKey = (None, 0)
    ) -> None:
        self.symbol = symbol
        self.view = view
        self.delivered = 0
        self.conflated = 0
        # Arrival (reactor time) of the frame behind the Summary that next()
        # last handed out; None if no frame caused it.
        self.arrival: float | None = None
        self._pending: bytes | None = None
        self._pending_arrival: float | None = None
        # next()'s Deferred, or wait()'s Future.
        self._waiter: Deferred[Any] | asyncio.Future[bytes | None] | None = None
        self._release: Callable[[Subscription], None] | None = release
        self._ended = False

    def offer(self, summary: bytes, arrival: float | None = None) -> bool:
        """Hand over or keep `summary`; True if it superseded one never read."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if isinstance(waiter, Deferred):
                self.delivered += 1
                self.arrival = arrival
                waiter.callback(summary)
                return False
            if not waiter.done():  # else its reader was cancelled: keep the Summary
                self.delivered += 1
                self.arrival = arrival
                waiter.set_result(summary)
                return False
        superseded = self._pending is not None
        if superseded:
            self.conflated += 1
        self._pending = summary
        self._pending_arrival = arrival
        return superseded

    def take(self) -> bytes | None:
        """The pending Summary if there is one, without waiting."""
        summary = self._pending
        if summary is not None:
            self._pending = None
            self.delivered += 1
            self.arrival = self._pending_arrival
        return summary

    def next(self) -> Deferred[Any]:
        """Fires with the next serialized Summary, or None once ended."""
        summary = self.take()
        if summary is not None:
            return succeed(summary)
        if self._ended:
            return succeed(None)
        self._waiter = Deferred(self._cancel_wait)
        return self._waiter

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bytes | None]:
        """next() for a coroutine on `loop`: the Future it awaits is resolved
        directly, with no Deferred (and its conversion) per Summary."""
        future: asyncio.Future[bytes | None] = loop.create_future()
        summary = self.take()
        if summary is not None or self._ended:
            future.set_result(summary)
        else:
            self._waiter = future
        return future

    def end(self) -> None:
        """The server is going away: the stream ends after what is pending."""
        self._ended = True
        waiter, self._waiter = self._waiter, None
        if isinstance(waiter, Deferred):
            waiter.callback(None)
        elif waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """The client is gone: release the demand (idempotent)."""
        self._pending = None
        self._ended = True
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def _cancel_wait(self, waiter: Deferred[Any]) -> None:
        if self._waiter is waiter:
            self._waiter = None
        waiter.errback(CancelledError())


class _View:
    """What the streams of one (symbol, exchanges, depth) share: the merged
    levels last published and their bytes, serialized once per change."""

    __slots__ = ("exchanges", "depth", "subscriptions", "published", "shown", "published_at", "summary")

    def __init__(self, exchanges: frozenset[str] | None, depth: int) -> None:
        self.exchanges = exchanges
        self.depth = depth
        self.subscriptions: set[Subscription] = set()
        self.published: KeyedTop = ([], [])
        # The exchanges' states as `summary` shows them.
        self.shown: tuple[ExchangeStatus, ...] = ()
        self.published_at = _wall_clock_us()
        # `published` serialized; None until someone needs the bytes (a symbol
        # held by --symbols alone has no subscriber to send them to).
        self.summary: bytes | None = None

    def serialized(self) -> bytes:
        if self.summary is None:
            self.summary = encode_keyed_summary(
                *self.published, _encoded_states(self.shown), self.published_at
            )
        return self.summary

    def statuses(self, books: dict[str, ExchangeBook]) -> tuple[ExchangeStatus, ...]:
        # `books` is kept in name order (Merger._watch_if_listed).
        exchanges = self.exchanges
        return tuple(
            (name, book.state, book.reason)
            for name, book in books.items()
            if exchanges is None or name in exchanges
        )

    def merge(self, books: Iterable[ExchangeBook]) -> KeyedTop:
        # The books' tops hold --depth levels, at least this view's depth:
        # merge_keys cuts the merged result, not each book's part of it.
        exchanges = self.exchanges
        tops = []
        for book in books:
            top = book.merged_top
            if top is None or (exchanges is not None and book.exchange not in exchanges):
                continue  # not live, or not in this view
            keys = book.merge_keys
            if keys is None:
                # Made at the first merge after the top changed: a symbol
                # merged only when asked for never makes most of them.
                keys = book.merge_keys = book_keys(book.exchange, *top)
            tops.append(keys)
        return merge_keys(tops, self.depth)


class _SymbolState:
    __slots__ = ("books", "refs", "views", "subscribers", "changed", "arrival")

    def __init__(self, default_view: ViewKey) -> None:
        self.books: dict[str, ExchangeBook] = {}
        self.refs = 0
        # Streams of the symbol, over all views: without any, changes are
        # only noted (a symbol held by --symbols alone is merged when someone
        # asks for it).
        self.subscribers = 0
        # Books whose top changed since the symbol was last merged (a
        # re-merge waits for the end of the reactor turn), and the earliest
        # arrival of the frames behind those changes.
        self.changed: set[str] = set()
        self.arrival: float | None = None
        # The daemon's own view (every exchange, --depth) always exists: it
        # is what current_summary() answers; the others live while streamed.
        self.views = {default_view: _View(*default_view)}

    def subscriptions(self) -> list[Subscription]:
        return [s for view in self.views.values() for s in view.subscriptions]


class Merger(Service):
    """Owns every ExchangeBook, the per-symbol demand and the subscribers."""

    log = Logger()

    def __init__(
        self,
        feeds: Iterable[Feed],
        depth: int = 10,
        pinned: Iterable[str] = (),
        reactor: IReactorTime | None = None,
    ) -> None:
        """`reactor`: re-merge once per reactor turn (see the module's
        docstring); without one, at every change (unit tests, benchmarks of
        the per-message path)."""
        self.feeds = {feed.name: feed for feed in feeds}
        self.depth = depth
        self._symbols: dict[str, _SymbolState] = {}
        # Symbols held for the daemon's whole life (--symbols), once listed.
        self._pinned_waiting = set(pinned)
        self._reactor = reactor
        # Symbols with a re-merge due at the end of this turn, in order.
        self._due: dict[str, _SymbolState] = {}
        self._flush_call: IDelayedCall | None = None

    # -- life cycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for feed in self.feeds.values():
            feed.when_symbols_loaded().addCallback(partial(self._feed_ready_after, feed))
        self.when_symbol_lists_loaded().addCallback(self._warn_unlisted_pinned)

    def stopService(self) -> None:
        super().stopService()
        self.flush()
        for state in self._symbols.values():
            for subscription in state.subscriptions():
                subscription.end()

    # -- demand -------------------------------------------------------------

    def listing_feeds(self, symbol: str) -> list[Feed]:
        """Loaded feeds that list `symbol`.

        Raises UnknownSymbol if every list is loaded and none has it, and
        SymbolListsUnavailable if some are not loaded and none loaded has it.
        """
        listing, pending = [], []
        for feed in self.feeds.values():
            symbols = feed.listed_symbols()
            if symbols is None:
                pending.append(feed.name)
            elif symbol in symbols:
                listing.append(feed)
        if listing:
            markets = {feed.name: feed.instrument(symbol) for feed in listing}
            if len({(market.base, market.quote) for market in markets.values()}) > 1:
                described = ", ".join(
                    f"{name} {market.base}/{market.quote}" for name, market in markets.items()
                )
                raise AmbiguousSymbol(
                    f"symbol {symbol!r} names different markets ({described}): not merged"
                )
            return listing
        if pending:
            raise SymbolListsUnavailable(
                f"symbol lists not loaded yet from: {', '.join(pending)}"
            )
        raise UnknownSymbol(
            f"symbol {symbol!r} is not listed by any enabled exchange "
            f"({', '.join(self.feeds)})"
        )

    def when_symbol_lists_loaded(self) -> Deferred[Any]:
        """Fires once every feed has loaded its symbol list."""
        return gatherResults(
            [feed.when_symbols_loaded() for feed in self.feeds.values()],
            consumeErrors=True,
        )

    def hold(self, symbol: str) -> None:
        """Add one unit of demand for `symbol` (a subscriber or --symbols)."""
        self.listing_feeds(symbol)
        state = self._symbols.get(symbol)
        if state is None:
            state = self._symbols[symbol] = _SymbolState((None, self.depth))
        state.refs += 1
        if state.refs == 1:
            for feed in self.feeds.values():
                self._watch_if_listed(feed, symbol, state)

    def release(self, symbol: str) -> None:
        """Remove one unit of demand; the last one unwatches the symbol."""
        state = self._symbols[symbol]
        state.refs -= 1
        if state.refs > 0:
            return
        del self._symbols[symbol]
        for exchange, book in state.books.items():
            self.feeds[exchange].unwatch(symbol)
            book.discard()

    def view_key(
        self, symbol: str, exchanges: Iterable[str] = (), depth: int = 0
    ) -> ViewKey:
        """The view a stream asks for, normalised so that streams asking for
        the same thing share it. Raises InvalidView, or UnknownSymbol when
        none of the asked exchanges lists the symbol."""
        if depth < 0 or depth > self.depth:
            raise InvalidView(
                f"depth {depth} is more than this daemon serves (--depth {self.depth})"
            )
        wanted = frozenset(name.strip().lower() for name in exchanges)
        unknown = sorted(wanted - set(self.feeds))
        if unknown:
            raise InvalidView(
                f"unknown or disabled exchange {', '.join(map(repr, unknown))}; "
                f"enabled: {', '.join(self.feeds)}"
            )
        if wanted:
            listing = {feed.name for feed in self.listing_feeds(symbol)}
            if not wanted & listing:
                raise UnknownSymbol(
                    f"symbol {symbol!r} is not listed by {', '.join(sorted(wanted))}"
                )
        return (wanted if wanted and wanted != set(self.feeds) else None, depth or self.depth)

    def subscribe(
        self,
        symbol: str,
        max_symbols: int | None = None,
        exchanges: Iterable[str] = (),
        depth: int = 0,
    ) -> Subscription:
        """A subscriber to `symbol` (only `exchanges`, if given; `depth`
        levels, 0 for --depth), already holding the current Summary.

        Raises TooManySymbols if `symbol` has no demand yet and `max_symbols`
        symbols already have some (a subscriber or --symbols); InvalidView or
        UnknownSymbol for a view that cannot be served (view_key).
        """
        key = self.view_key(symbol, exchanges, depth)
        if max_symbols is not None and symbol not in self._symbols:
            if len(self._symbols) >= max_symbols:
                raise TooManySymbols(
                    f"cannot watch {symbol!r}: the daemon already watches its limit "
                    f"of {max_symbols} symbols"
                )
        self.hold(symbol)
        state = self._symbols[symbol]
        self._merge_unstreamed(state)
        view = state.views.get(key)
        if view is None:
            view = state.views[key] = _View(*key)
            self._publish(view, view.merge(state.books.values()), state.books, None)
        elif view.statuses(state.books) != view.shown:
            # A state change that moves no level publishes nothing (see
            # _book_changed); a new subscriber still gets the states as they are.
            self._publish(view, view.published, state.books, None)
        subscription = Subscription(symbol, self._unsubscribe, key)
        view.subscriptions.add(subscription)
        state.subscribers += 1
        subscription.offer(view.serialized())
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        state = self._symbols[subscription.symbol]
        view = state.views[subscription.view]
        view.subscriptions.discard(subscription)
        state.subscribers -= 1
        if not view.subscriptions and subscription.view != (None, self.depth):
            del state.views[subscription.view]
        self.release(subscription.symbol)

    def _feed_ready_after(self, feed: Feed, _: object) -> None:
        self._feed_ready(feed)

    def _feed_ready(self, feed: Feed) -> None:
        for symbol, state in self._symbols.items():
            self._watch_if_listed(feed, symbol, state)
        listed = feed.listed_symbols() or frozenset()
        for symbol in sorted(self._pinned_waiting & listed):
            self._pinned_waiting.discard(symbol)
            self.hold(symbol)

    def _warn_unlisted_pinned(self, _: object) -> None:
        for symbol in sorted(self._pinned_waiting):
            self.log.error(
                "--symbols: {symbol} is not listed by any enabled exchange; ignored",
                symbol=symbol,
            )

    def _watch_if_listed(self, feed: Feed, symbol: str, state: _SymbolState) -> None:
        listed = feed.listed_symbols()
        if listed is None or symbol not in listed or feed.name in state.books:
            return
        book = ExchangeBook(feed.name, symbol, self._book_changed, self.depth)
        state.books[feed.name] = book
        # In name order, as Summaries list the exchanges: no sort per publish.
        state.books = dict(sorted(state.books.items()))
        feed.watch(book)

    # -- merge and fan-out ----------------------------------------------------

    def books(self, symbol: str) -> dict[str, ExchangeBook]:
        state = self._symbols.get(symbol)
        return dict(state.books) if state else {}

    def current_summary(self, symbol: str) -> bytes | None:
        state = self._symbols.get(symbol)
        if state is None:
            return None
        self._merge_unstreamed(state)
        return state.views[(None, self.depth)].serialized()

    def _book_changed(self, changed: ExchangeBook, arrival: float | None) -> None:
        """A book committed a change: `arrival` is its frame's arrival (or None)."""
        state = self._symbols.get(changed.symbol)
        if state is None or state.books.get(changed.exchange) is not changed:
            return
        # The committed levels are read now: the sync may change the book
        # again before the re-merge, and only what it committed may be shown.
        book = changed.book
        top = (book.top_bids(self.depth), book.top_asks(self.depth)) if changed.live else None
        if top == changed.merged_top:
            return  # the change is below this book's top N (or it stays withheld)
        changed.merged_top = top
        changed.merge_keys = None  # made from `top` by the next merge
        state.changed.add(changed.exchange)
        if not state.subscribers:
            return  # merged when someone asks (subscribe(), current_summary())
        if arrival is not None and (state.arrival is None or arrival < state.arrival):
            state.arrival = arrival
        if self._reactor is None or not self.running:
            # Stopped: no timer may outlive the service.
            self._merge(state)
            return
        if changed.symbol in self._due:
            metrics.MERGES_COALESCED.inc()
        self._due[changed.symbol] = state
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Re-merge every symbol changed since the last flush (the end of a
        reactor turn; also before stopping)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        due, self._due = self._due, {}
        for symbol, state in due.items():
            if self._symbols.get(symbol) is state:  # else released meanwhile
                self._merge(state)

    def _merge_unstreamed(self, state: _SymbolState) -> None:
        """Someone asks for a symbol no stream watched: merge the changes it
        only noted (_book_changed)."""
        if state.changed and not state.subscribers:
            state.arrival = None  # no frame's latency: it waited for nobody
            self._merge(state)

    def _merge(self, state: _SymbolState) -> None:
        if not state.changed:
            return  # merged already (a subscriber came before the turn ended)
        changed, arrival = state.changed, state.arrival
        state.changed, state.arrival = set(), None
        for view in state.views.values():
            if view.exchanges is not None and view.exchanges.isdisjoint(changed):
                continue
            merged = view.merge(state.books.values())
            # Only the levels decide: the exchanges' states and the time ride along.
            if merged != view.published:
                self._publish(view, merged, state.books, arrival)

    def _publish(
        self,
        view: _View,
        merged: KeyedTop,
        books: dict[str, ExchangeBook],
        arrival: float | None,
    ) -> None:
        view.published = merged
        view.shown = view.statuses(books)
        view.published_at = _wall_clock_us()
        view.summary = None
        if not view.subscriptions:
            return
        summary = view.serialized()
        conflated = 0
        for subscription in view.subscriptions:
            conflated += subscription.offer(summary, arrival)
        if conflated:
            metrics.SUMMARIES_CONFLATED.inc(conflated)  # once: the counter takes a lock
