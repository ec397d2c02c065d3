"""One exchange's order book for one symbol: two sorted sides, validated
levels (`OrderBook`), and the handle a venue's sync drives (`ExchangeBook`).

Knows nothing about exchanges or the network. Prices and amounts are floats
(the gRPC wire type); the feeds parse the exchanges' decimal strings into
floats before handing levels over.

A book update is a transaction (docs/DESIGN.md, "A book update is a
transaction"): the sync changes `ExchangeBook.book` freely, runs every check
of its venue, and only then commits (the listener — the merger — is told) or
withdraws the book. Nothing reads the levels between two notifications, so no
client can see a state the sync would have rejected.
"""

from __future__ import annotations

import enum
import math
import re
from itertools import islice
from typing import Callable, Iterable, Sequence

from sortedcontainers import SortedDict
from twisted.logger import Logger

from aggregator import metrics

Level = tuple[float, float]
"""(price, amount)."""

# Larger than any real price or size (BTC ~1e5 USD; meme-coin books ~1e12
# units): a bigger number is corruption, not a market. Also keeps every value
# far from overflow when spreads and sums are computed.
MAX_VALUE = 1e15


class BookState(enum.Enum):
    SYNCING = "syncing"  # subscribed, waiting for a snapshot
    LIVE = "live"  # in sync: takes part in the merge
    STALE = "stale"  # gap, disconnect, bad data: withheld until resynced


class InvalidLevel(ValueError):
    """A level with a NaN, infinite, negative or otherwise unusable number."""


def check_level(price: float, amount: float) -> None:
    """Raise InvalidLevel unless 0 < price < MAX_VALUE and 0 <= amount < MAX_VALUE.

    The chained comparisons are False for NaN, so one test covers NaN, ±inf,
    negative and implausibly huge numbers alike.
    """
    if not (0.0 < price < MAX_VALUE and 0.0 <= amount < MAX_VALUE):
        raise InvalidLevel(f"invalid level price={price!r} amount={amount!r}")


# What a venue's decimal text may look like: digits with an optional
# fraction and exponent. float() alone also takes "1_000", " 12", "+5",
# "inf" and "nan", none of which a venue ever sends.
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")


def parse_number(raw: object) -> float:
    """A venue's decimal string (or JSON number) → float; InvalidLevel otherwise."""
    if isinstance(raw, str):
        if _DECIMAL.fullmatch(raw):
            return float(raw)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    raise InvalidLevel(f"not a decimal number: {raw!r}")


def parse_levels(raw: object) -> list[Level]:
    """[[price, amount], ...] as decimal strings (or numbers) → floats.

    Each level must be a two-element list: a bare string where a pair
    belongs is rejected, not read character by character. Raises
    InvalidLevel for anything else; range checks (NaN, inf, negative) are
    the book's, done when the levels are applied.
    """
    if type(raw) is not list:
        raise InvalidLevel(f"levels must be a list, not {type(raw).__name__}")
    # The usual level (a pair of decimal strings) is checked and converted
    # inline: no Python call per level. Anything else goes to parse_number,
    # which accepts JSON numbers and names what it rejects.
    fullmatch = _DECIMAL.fullmatch
    levels = []
    for entry in raw:
        if type(entry) is not list or len(entry) != 2:
            raise InvalidLevel(f"a level must be a [price, amount] pair: {entry!r}")
        price, amount = entry
        if type(price) is str and type(amount) is str and fullmatch(price) and fullmatch(amount):
            levels.append((float(price), float(amount)))
        else:
            levels.append((parse_number(price), parse_number(amount)))
    return levels


def check_levels(levels: Iterable[Level]) -> None:
    """check_level for every level, the comparisons inline (no call per level)."""
    for price, amount in levels:
        if not (0.0 < price < MAX_VALUE and 0.0 <= amount < MAX_VALUE):
            check_level(price, amount)  # raises, naming the level


class OrderBook:
    """Price → amount per side. Amount 0 deletes a level.

    A snapshot cut at a depth limit knows nothing beyond its worst level (its
    horizon): levels further out exist but are unknown until a diff touches
    them. thinner_than() tells when that matters.
    """

    __slots__ = ("_bids", "_asks", "_bid_horizon", "_ask_horizon", "_touched_bid", "_touched_ask")

    def __init__(self) -> None:
        self._bids: SortedDict = SortedDict()
        self._asks: SortedDict = SortedDict()
        self._bid_horizon: float | None = None
        self._ask_horizon: float | None = None
        # The best (highest bid, lowest ask) price changed since the last
        # top_changed(): ±inf after a replace/clear ("anything may have").
        self._touched_bid = math.inf
        self._touched_ask = -math.inf

    def replace(
        self, bids: Iterable[Level], asks: Iterable[Level], truncated_at: int | None = None
    ) -> None:
        """Become exactly these levels (a snapshot). Zero amounts are skipped.

        `truncated_at`: the snapshot's per-side level limit; a side that came
        back that full may have more levels beyond its last one.
        """
        bids, asks = list(bids), list(asks)
        check_levels(bids)
        check_levels(asks)
        self._touched_bid, self._touched_ask = math.inf, -math.inf
        self._bids = _replaced(self._bids, bids)
        self._asks = _replaced(self._asks, asks)
        self._bid_horizon = self._ask_horizon = None
        if truncated_at is not None:
            if len(bids) >= truncated_at:
                self._bid_horizon = self._bids.keys()[0]
            if len(asks) >= truncated_at:
                self._ask_horizon = self._asks.keys()[-1]

    def thinner_than(self, depth: int) -> bool:
        """Whether a cut side holds fewer than `depth` levels at or inside its
        horizon: its top `depth` may then include levels the book never saw."""
        if self._bid_horizon is not None:
            if len(self._bids) - self._bids.bisect_left(self._bid_horizon) < depth:
                return True
        if self._ask_horizon is not None:
            if self._asks.bisect_right(self._ask_horizon) < depth:
                return True
        return False

    def apply(self, bids: Sequence[Level], asks: Sequence[Level]) -> None:
        """Set absolute amounts; zero deletes (absent levels are fine to delete).

        Validates everything before changing anything: a rejected update leaves
        the book as it was.
        """
        check_levels(bids)
        check_levels(asks)
        if bids:
            _apply_side(self._bids, bids)
            self._touched_bid = max(self._touched_bid, max(bids)[0])
        if asks:
            _apply_side(self._asks, asks)
            self._touched_ask = min(self._touched_ask, min(asks)[0])

    def clear(self) -> None:
        self._bids.clear()
        self._asks.clear()
        self._bid_horizon = self._ask_horizon = None
        self._touched_bid, self._touched_ask = math.inf, -math.inf

    def top_changed(self, n: int) -> bool:
        """Whether the top `n` of a side may differ from what it was at the
        previous call (which this one forgets). Exact in the "no" direction:
        when every price changed since then lies beyond the current n-th
        level, the levels at or inside it were never touched, so they are the
        same n levels as before. One bisection per side, no lists built.
        """
        touched_bid, touched_ask = self._touched_bid, self._touched_ask
        self._touched_bid, self._touched_ask = -math.inf, math.inf
        if n <= 0:
            return False
        bids, asks = self._bids, self._asks
        # The n-th level through C iterators (indexing the keys view costs
        # Python calls).
        if touched_bid != -math.inf and (
            len(bids) < n or touched_bid >= next(islice(reversed(bids), n - 1, None))
        ):
            return True
        return touched_ask != math.inf and (
            len(asks) < n or touched_ask <= next(islice(asks, n - 1, None))
        )

    def top_bids(self, n: int) -> list[Level]:
        """Best (highest) first."""
        bids = self._bids
        # reversed()/iter() of a SortedDict run over its sorted keys in C;
        # indexing its keys view costs Python calls per level.
        prices = list(islice(reversed(bids), n)) if n > 0 else []
        return list(zip(prices, map(bids.__getitem__, prices)))

    def top_asks(self, n: int) -> list[Level]:
        """Best (lowest) first."""
        asks = self._asks
        prices = list(islice(asks, n)) if n > 0 else []
        return list(zip(prices, map(asks.__getitem__, prices)))

    def best_bid(self) -> float | None:
        return self._bids.keys()[-1] if self._bids else None

    def best_ask(self) -> float | None:
        return self._asks.keys()[0] if self._asks else None

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid >= ask

    def __len__(self) -> int:
        return len(self._bids) + len(self._asks)

    def depth(self) -> tuple[int, int]:
        return len(self._bids), len(self._asks)


# A side this small is replaced in place: a whole-book message (Bitstamp's
# served top) mostly changes amounts at the prices already held, and
# rebuilding a SortedDict costs more than updating those.
_REPLACED_IN_PLACE = 64


def _replaced(side: SortedDict, levels: list[Level]) -> SortedDict:
    """`side` holding exactly `levels` (zero amounts skipped)."""
    if len(side) > _REPLACED_IN_PLACE or len(levels) > _REPLACED_IN_PLACE:
        return SortedDict((p, a) for p, a in levels if a > 0.0)
    wanted = {p: a for p, a in levels if a > 0.0}
    for price in [p for p in side if p not in wanted]:
        del side[price]
    for price in [p for p in wanted if p not in side]:
        side[price] = wanted[price]  # inserted in order by SortedDict
    # SortedDict is a dict that also keeps its keys sorted: once every price
    # is in, the amounts are set as in a plain dict, in one C call.
    dict.update(side, wanted)
    return side


def _apply_side(side: SortedDict, levels: Sequence[Level]) -> None:
    for price, amount in levels:
        if amount > 0.0:
            side[price] = amount
        else:
            side.pop(price, None)


BookListener = Callable[["ExchangeBook", "float | None"], None]
"""listener(book, arrival): a live book's levels or state changed. `arrival`
is the reactor time the frame that caused it arrived at, None when no frame
did (a snapshot, a withdrawal): then no latency is measured."""


class ExchangeBook:
    """One exchange's book for one symbol, with its sync state.

    The handle a venue's sync drives: change `book` (the levels), then
    commit() the transaction, go_live() once it vouches for the levels, or
    withdraw() them. Every state change is logged once, with its reason.
    """

    log = Logger()

    def __init__(
        self, exchange: str, symbol: str, listener: BookListener, depth: int = 10
    ) -> None:
        self.exchange = exchange
        self.symbol = symbol
        # Levels per side the merge takes from this book: the sync must keep
        # at least this many exact (see OrderBook.thinner_than).
        self.depth = depth
        self.book = OrderBook()
        # This book's top `depth` levels as the merged book last saw them
        # (None while not live): most diffs only touch deeper levels, and then
        # nothing needs re-merging. Owned by the listener.
        self.merged_top: tuple[list[Level], list[Level]] | None = None
        # The same levels as the listener's merge keys (aggregator/merger.py),
        # made when first merged; None until then.
        self.merge_keys: tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]] | None = None
        self.state = BookState.SYNCING
        self.reason = "subscribing"
        self._listener = listener
        metrics.BOOK_STATE.state(exchange, symbol, self.state.value)

    @property
    def live(self) -> bool:
        return self.state is BookState.LIVE

    def commit(self, arrival: float | None) -> None:
        """The levels passed every check: a live book publishes them, unless
        every change since the last notification lies beyond the top `depth`
        (most diffs: then the merge has nothing new to read)."""
        if self.state is BookState.LIVE and self.book.top_changed(self.depth):
            self._listener(self, arrival)

    def go_live(self, arrival: float | None = None) -> None:
        """The sync vouches for the levels: they take part in the merge."""
        self.book.top_changed(self.depth)  # the listener reads the whole top now
        self._set_state(BookState.LIVE, "in sync")
        self._listener(self, arrival)

    def mark_syncing(self, reason: str) -> None:
        self.withdraw(BookState.SYNCING, reason)

    def mark_stale(self, reason: str) -> None:
        self.withdraw(BookState.STALE, reason)

    def withdraw(self, state: BookState, reason: str) -> None:
        """The sync cannot vouch for the levels: clear them and leave the merge."""
        was_live = self.live
        self.book.clear()
        self._set_state(state, reason)
        if was_live:
            self._listener(self, None)

    def _set_state(self, state: BookState, reason: str) -> None:
        if state is self.state:
            # Already logged as a transition; the reason clients see follows
            # (a refused subscription while syncing, say) without a new line.
            # A live book's reason stays "in sync".
            if state is not BookState.LIVE:
                self.reason = reason
            return
        self.log.info(
            "{exchange} {symbol}: {old} -> {new} ({reason})",
            exchange=self.exchange,
            symbol=self.symbol,
            old=self.state.value,
            new=state.value,
            reason=reason,
        )
        self.state = state
        self.reason = reason
        metrics.BOOK_STATE.state(self.exchange, self.symbol, state.value)

    def discard(self) -> None:
        """Nobody watches the symbol any more: forget its metric."""
        metrics.BOOK_STATE.remove(self.exchange, self.symbol)
