"""Synthetic data source: random-walk books for symbols listed on both exchanges.

Per symbol, one fair-value random walk is shared by both exchanges; each exchange quotes around
it with its own slowly varying noise and half-spread, so the two books interleave and now and
then cross each other (legitimate: an arbitrage). Each book on its own is never crossed and
never empty.

Everything is a function of the seed and of the event index: the n-th change of a market
depends only on (seed, exchange, symbol, n), never on timing or on the other exchange's
progress, so equal seeds give equal books after equal numbers of changes. Seeds are mixed with
zlib.crc32, not hash(), which is salted per process.
"""

from __future__ import annotations

import math
import random
import zlib
from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import count
from typing import Iterator

from .clock import Clock
from .market import Book, Level, Market, fixed
from .player import PlayedSource, Player, Step
from .venue import Venue
from .venues import VENUES

# Changes per second per exchange+symbol at speed 1.
RATE = 10.0
# With loop=False each synthetic market stops after this many changes, so that tests can
# reach a quiet end state.
FINITE_CHANGES = 200
# Levels per side at start; random deletes stop below MIN_DEPTH, and adds are favoured below
# TARGET_DEPTH and deletes above MAX_DEPTH, so depth wanders around 60-80.
INITIAL_DEPTH = 60
MIN_DEPTH = 50
TARGET_DEPTH = 60
MAX_DEPTH = 90


@dataclass(frozen=True)
class SymbolSpec:
    """A synthetic instrument. Prices are integer ticks of 10**-tick_exp, sizes integer lots
    of 10**-size_exp; `grid` is the typical distance between levels, in ticks."""

    symbol: str
    mid: float
    tick_exp: int
    grid: int
    size_exp: int
    size_median: float


SPECS: tuple[SymbolSpec, ...] = (
    SymbolSpec("ethbtc", 0.05, 5, 1, 4, 2.0),
    SymbolSpec("btcusdt", 60000.0, 2, 50, 5, 0.25),
    SymbolSpec("ethusdt", 3000.0, 2, 5, 4, 3.0),
    SymbolSpec("ltcbtc", 0.0015, 6, 1, 3, 25.0),
    SymbolSpec("btceur", 55000.0, 2, 50, 5, 0.25),
    SymbolSpec("btcusd", 60000.0, 2, 50, 5, 0.25),
)
SYMBOLS = tuple(spec.symbol for spec in SPECS)

# Walk and noise parameters, in units of the symbol's grid.
WALK_SIGMA = 0.3  # fair-value step per change
WALK_REVERSION = 0.0002  # weak pull back to the start mid so long runs stay realistic
NOISE_SIGMA = 1.0  # stationary std of each exchange's deviation from fair value (crosses ~1-4% of the time)
NOISE_RHO = 0.98  # its autocorrelation per change


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random((seed << 32) ^ zlib.crc32(":".join(parts).encode()))


class FairValueWalk:
    """The shared fair value (in ticks) of one symbol, indexed by change number.

    Each consumer (exchange) reads value n at its n-th change; values no consumer still needs
    are dropped, so memory stays bounded however long the simulator runs.
    """

    def __init__(self, seed: int, spec: SymbolSpec, consumers: int):
        self._rng = _rng(seed, "walk", spec.symbol)
        self._start = spec.mid / 10.0**-spec.tick_exp
        self._sigma = WALK_SIGMA * spec.grid
        self._values = [self._start]
        self._base = 0  # index of _values[0]
        self._positions = [0] * consumers

    def value(self, n: int, consumer: int) -> float:
        while self._base + len(self._values) <= n:
            last = self._values[-1]
            self._values.append(
                last + self._rng.gauss(0.0, self._sigma) - WALK_REVERSION * (last - self._start)
            )
        value = self._values[n - self._base]
        self._positions[consumer] = n
        drop = min(self._positions) - self._base
        if drop > 1024:  # trim in chunks, not on every call
            del self._values[:drop]
            self._base += drop
        return value


class _Side:
    """One side of the generator's integer mirror of a book: tick -> lots, plus sorted ticks."""

    def __init__(self, is_bid: bool):
        self.is_bid = is_bid
        self.lots: dict[int, int] = {}
        self._ticks: list[int] = []  # ascending

    def __len__(self) -> int:
        return len(self._ticks)

    def best(self) -> int | None:
        if not self._ticks:
            return None
        return self._ticks[-1] if self.is_bid else self._ticks[0]

    def worst(self) -> int:
        return self._ticks[0] if self.is_bid else self._ticks[-1]

    def at_rank(self, i: int) -> int:
        """The tick of the i-th best level (0 = best)."""
        return self._ticks[-1 - i] if self.is_bid else self._ticks[i]

    def set(self, tick: int, lots: int) -> None:
        if tick not in self.lots:
            insort(self._ticks, tick)
        self.lots[tick] = lots

    def delete(self, tick: int) -> None:
        if self.lots.pop(tick, None) is not None:
            del self._ticks[bisect_left(self._ticks, tick)]


class SyntheticBookMaker:
    """Generates the change events of one synthetic exchange+symbol book."""

    def __init__(self, seed: int, venue: type[Venue], spec: SymbolSpec, walk: FairValueWalk, consumer: int):
        exchange = venue.name
        self.spec = spec
        self.exchange = exchange
        self._walk = walk
        self._consumer = consumer
        self._rng = _rng(seed, exchange, spec.symbol)
        self._noise_sigma = NOISE_SIGMA * spec.grid
        self._noise = self._rng.gauss(0.0, self._noise_sigma)
        self._half_spread = venue.synthetic_half_spread * spec.grid
        self.bids = _Side(True)
        self.asks = _Side(False)
        self.first_update_id = self._rng.randrange(10**8, 10**9)
        self._n = 0
        self._price_decimals, self._amount_decimals = venue.decimals(spec.symbol, spec.tick_exp)
        self._zero = fixed(0, 0, self._amount_decimals)
        self._initial_book()

    # -- formatting

    def _level(self, tick: int, lots: int) -> Level:
        amount = fixed(lots, self.spec.size_exp, self._amount_decimals) if lots else self._zero
        return fixed(tick, self.spec.tick_exp, self._price_decimals), amount

    def levels(self) -> tuple[list[Level], list[Level]]:
        return (
            [self._level(t, self.bids.lots[t]) for t in sorted(self.bids.lots, reverse=True)],
            [self._level(t, self.asks.lots[t]) for t in sorted(self.asks.lots)],
        )

    # -- random pieces

    def _lots(self, rank: int) -> int:
        # Log-normal sizes, somewhat larger deeper in the book.
        size = self.spec.size_median * self._rng.lognormvariate(0.0, 0.9) * (1.0 + rank / 25.0)
        return max(1, round(size * 10**self.spec.size_exp))

    def _rank(self, side: _Side) -> int:
        # Mostly near the top: geometric with mean ~3.
        return min(int(self._rng.expovariate(1 / 3.0)), len(side) - 1)

    def _limits(self, fair: float) -> tuple[int, int]:
        mid = fair + self._noise
        return math.floor(mid - self._half_spread), math.ceil(mid + self._half_spread)

    def _initial_book(self) -> None:
        bid_cap, ask_floor = self._limits(self._walk.value(0, self._consumer))
        for side, start, direction in ((self.bids, bid_cap, -1), (self.asks, ask_floor, 1)):
            tick = start
            for rank in range(INITIAL_DEPTH):
                if tick < 1:
                    break
                side.set(tick, self._lots(rank))
                tick += direction * self._rng.randint(1, 2 * self.spec.grid)

    def _new_tick(self, side: _Side, other: _Side, bid_cap: int, ask_floor: int) -> int | None:
        """A free price for a new level on `side`, or None when the draw is unusable."""
        if len(side) < MIN_DEPTH and self._rng.random() < 0.5:
            # Refill the depth at the far end.
            gap = self._rng.randint(1, 2 * self.spec.grid)
            tick = side.worst() - gap if side.is_bid else side.worst() + gap
        else:
            # Near the top, possibly improving it, but never through this side's limit nor
            # through the other side's best (keeps the book uncrossed).
            offset = int(self._rng.expovariate(1 / (3.0 * self.spec.grid)))
            tick = bid_cap - offset if side.is_bid else ask_floor + offset
            limit = other.best()
            if limit is not None and (tick >= limit if side.is_bid else tick <= limit):
                return None
        if tick < 1 or tick in side.lots:
            return None
        return tick

    # -- one change event

    def step(self) -> tuple[list[Level], list[Level]]:
        """Advance by one change event; returns the changed (bids, asks) levels."""
        self._n += 1
        fair = self._walk.value(self._n, self._consumer)
        self._noise = NOISE_RHO * self._noise + math.sqrt(1 - NOISE_RHO**2) * self._rng.gauss(
            0.0, self._noise_sigma
        )
        bid_cap, ask_floor = self._limits(fair)
        touched: dict[tuple[bool, int], int] = {}  # (is_bid, tick) -> lots before this event
        budget = self._rng.randint(1, 5)

        def touch(side: _Side, tick: int) -> None:
            touched.setdefault((side.is_bid, tick), side.lots.get(tick, 0))

        # Follow the quote: levels inside the new limits are pulled, best first. Never the last
        # level of a side; a big jump takes a few events to follow (each event is 1-5 levels).
        for side, inside in ((self.bids, lambda t: t > bid_cap), (self.asks, lambda t: t < ask_floor)):
            while budget and len(side) > 1 and inside(side.at_rank(0)):
                best = side.at_rank(0)
                touch(side, best)
                side.delete(best)
                budget -= 1

        for _ in range(budget):
            side = self.bids if self._rng.random() < 0.5 else self.asks
            other = self.asks if side is self.bids else self.bids
            depth = len(side)
            add_w = 0.35 + (0.4 if depth < TARGET_DEPTH else 0.0)
            delete_w = 0.2 + (0.4 if depth > MAX_DEPTH else 0.0)
            r = self._rng.random() * (add_w + delete_w + 0.45)
            if r < add_w:
                tick = self._new_tick(side, other, bid_cap, ask_floor)
                if tick is not None:
                    touch(side, tick)
                    side.set(tick, self._lots(self._rank(side)))
                    continue
            elif r < add_w + delete_w and depth > MIN_DEPTH:
                tick = side.at_rank(self._rank(side))
                touch(side, tick)
                side.delete(tick)
                continue
            # Default: a new size for an existing level near the top.
            tick = side.at_rank(self._rank(side))
            touch(side, tick)
            side.set(tick, self._lots(self._rank(side)))

        bids: list[Level] = []
        asks: list[Level] = []
        for (is_bid, tick), before in touched.items():
            side = self.bids if is_bid else self.asks
            after = side.lots.get(tick, 0)
            if after == before:
                continue  # e.g. added then deleted within the event, or same size redrawn
            (bids if is_bid else asks).append(self._level(tick, after))
        if not bids and not asks:
            # Rare; still a change event, never an empty one.
            best = self.bids.at_rank(0)  # never empty
            lots = self.bids.lots[best] + 1
            self.bids.set(best, lots)
            bids.append(self._level(best, lots))
        return bids, asks


class SyntheticSource(PlayedSource):
    """Synthetic books for SYMBOLS on every venue, each changing RATE * speed times a second."""

    def __init__(
        self,
        clock: Clock,
        seed: int = 1,
        speed: float = 1.0,
        loop: bool = True,
        symbols: tuple[str, ...] = SYMBOLS,
        venues: tuple[type[Venue], ...] = VENUES,
    ):
        super().__init__()
        for spec in SPECS:
            if spec.symbol not in symbols:
                continue
            listing = [
                venue for venue in venues
                if venue.synthetic_symbols is None or spec.symbol in venue.synthetic_symbols
            ]
            walk = FairValueWalk(seed, spec, len(listing))
            for consumer, venue in enumerate(listing):
                exchange = venue.name
                maker = SyntheticBookMaker(seed, venue, spec, walk, consumer)
                bids, asks = maker.levels()
                market = Market(exchange, spec.symbol, clock.seconds, Book(bids, asks), maker.first_update_id)
                self.markets[(exchange, spec.symbol)] = market
                # Random phase so that the ten markets do not all tick at the same instant.
                phase = _rng(seed, "phase", exchange, spec.symbol).random() / RATE
                script = self._script(maker, market, phase, FINITE_CHANGES if not loop else None)
                self._players.append(Player(clock, script, speed, f"synthetic {exchange}:{spec.symbol}"))

    @staticmethod
    def _script(maker: SyntheticBookMaker, market: Market, phase: float, limit: int | None) -> Iterator[Step]:
        def change() -> None:
            bids, asks = maker.step()
            market.apply(bids, asks)

        for n in count():
            if limit is not None and n >= limit:
                return
            yield phase + n / RATE, change
