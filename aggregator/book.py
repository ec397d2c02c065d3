"""One exchange's order book for one symbol: two sorted sides, validated levels.

Knows nothing about exchanges or the network. Prices and amounts are floats
(the gRPC wire type); the feeds parse the exchanges' decimal strings into
floats before handing levels over.
"""

from __future__ import annotations

import enum
from typing import Iterable, Sequence

from sortedcontainers import SortedDict

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


def parse_levels(raw: Iterable[Sequence[object]]) -> list[Level]:
    """[[price, amount], ...] as decimal strings (or numbers) → floats.

    Raises InvalidLevel for anything unparsable; range checks (NaN, inf,
    negative) are the book's, done when the levels are applied.
    """
    try:
        return [(float(entry[0]), float(entry[1])) for entry in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise InvalidLevel(f"unparsable levels: {error}") from None


class OrderBook:
    """Price → amount per side. Amount 0 deletes a level.

    A snapshot cut at a depth limit knows nothing beyond its worst level (its
    horizon): levels further out exist but are unknown until a diff touches
    them. thinner_than() tells when that matters.
    """

    __slots__ = ("_bids", "_asks", "_bid_horizon", "_ask_horizon")

    def __init__(self) -> None:
        self._bids: SortedDict = SortedDict()
        self._asks: SortedDict = SortedDict()
        self._bid_horizon: float | None = None
        self._ask_horizon: float | None = None

    def replace(
        self, bids: Iterable[Level], asks: Iterable[Level], truncated_at: int | None = None
    ) -> None:
        """Become exactly these levels (a snapshot). Zero amounts are skipped.

        `truncated_at`: the snapshot's per-side level limit; a side that came
        back that full may have more levels beyond its last one.
        """
        bids, asks = list(bids), list(asks)
        for price, amount in bids + asks:
            check_level(price, amount)
        self._bids = SortedDict((p, a) for p, a in bids if a > 0.0)
        self._asks = SortedDict((p, a) for p, a in asks if a > 0.0)
        full = truncated_at is not None
        self._bid_horizon = self._bids.keys()[0] if full and len(bids) >= truncated_at else None
        self._ask_horizon = self._asks.keys()[-1] if full and len(asks) >= truncated_at else None

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
        for price, amount in bids:
            check_level(price, amount)
        for price, amount in asks:
            check_level(price, amount)
        _apply_side(self._bids, bids)
        _apply_side(self._asks, asks)

    def clear(self) -> None:
        self._bids.clear()
        self._asks.clear()
        self._bid_horizon = self._ask_horizon = None

    def top_bids(self, n: int) -> list[Level]:
        """Best (highest) first."""
        bids = self._bids
        prices = bids.keys()[: -n - 1 : -1] if n > 0 else []
        return [(p, bids[p]) for p in prices]

    def top_asks(self, n: int) -> list[Level]:
        """Best (lowest) first."""
        asks = self._asks
        return [(p, asks[p]) for p in asks.keys()[:n]] if n > 0 else []

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


def _apply_side(side: SortedDict, levels: Sequence[Level]) -> None:
    for price, amount in levels:
        if amount > 0.0:
            side[price] = amount
        else:
            side.pop(price, None)
