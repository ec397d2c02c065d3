"""Scale source: many generated symbols changing at a given total rate, for benchmarks and
soak tests.

N symbols named s0001usdt, s0002usdt, ... (base asset S0001, quote USDT) are listed on both
exchanges (Binance status TRADING, Bitstamp trading Enabled). Each has a random-walk book per
exchange with realistic ticks and sizes: a mid price drawn log-uniformly between 0.01 and
50 000, a tick of about 10**-4 of it, level sizes worth ~2000 USDT (log-normal), a dense top of
book. Change events hit 1-5 levels near the top; now and then the book's centre moves a tick
(the level it moves onto is deleted), so books never cross and stay bounded.

Rates are totals over all symbols, in change events per second (times `speed`): `rate` for
Binance, `bitstamp_rate` for Bitstamp. Which symbol changes is drawn uniformly per event.
Whole-market mode (`loads`, one VenueLoad per venue) sets each venue's own symbols (the first
N generated ones), total rate and, with a `cap`, heavy-tailed per-symbol rates
(`heavy_tailed_rates`): the symbol of each event is then drawn in proportion to its rate.
Generation runs in a LoopingCall every `tick` seconds on the reactor clock and makes the events
due by then (so a test driving a Clock gets exact counts); when the reactor falls behind by
more than MAX_BACKLOG seconds' worth, the excess is skipped and counted (`stats()`), so
the achieved rate shows what the machine sustains. The Binance server is put in batch mode for
this source: every event is one frame with contiguous U..u, written at the end of the tick.

Determinism: the n-th event of an exchange depends only on the seed and n.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .clock import Clock, looping_call
from .market import Book, Level, Market, fixed
from .player import PlayedSource
from .venue import Venue
from .venues import VENUES

QUOTE = "usdt"
DEFAULT_SYMBOLS = 200
DEFAULT_RATE = 5000.0
DEFAULT_TICK = 0.005
# Most events the generator catches up on after a late tick, in seconds of events.
MAX_BACKLOG = 0.1
# With loop=False the source stops after this many events per symbol on average.
FINITE_CHANGES = 200
INITIAL_DEPTH = 100  # ticks per side that may hold a level at start
FILL = 0.85  # share of those that do
MIN_LEVELS = 20  # deletes stop below this many levels on a side
MOVE_PROBABILITY = 0.08  # per event: the centre moves one tick
REVERSION = 200  # ticks: the centre is pulled back towards its start beyond ~this
SIZES = 64  # distinct level sizes per book
# Whole-market mode: the shape of the Pareto weights of heavy-tailed per-symbol rates. 0.5 is
# the heaviest tail that still reads as a market: with 1,500 symbols, 6,000 events/s and a cap
# of 10/s, ~350 symbols sit at the cap (what Binance's 100 ms depth stream allows at most) and
# half of them change under 2.1 times a second (a thinner tail, 1.0, puts the median at 2.7).
PARETO_SHAPE = 0.5


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random((seed << 32) ^ zlib.crc32(":".join(parts).encode()))


def scale_symbol_names(count: int) -> list[str]:
    """s0001usdt, s0002usdt, ... (at least 4 digits)."""
    width = max(4, len(str(count)))
    return [f"s{i:0{width}d}{QUOTE}" for i in range(1, count + 1)]


@dataclass(frozen=True, slots=True)
class VenueLoad:
    """One venue's traffic in whole-market mode: the first `symbols` generated symbols are
    listed on it, changing `rate` times a second in total (times `speed`); with `cap` the
    per-symbol rates are heavy-tailed (heavy_tailed_rates) and none exceeds `cap`, without it
    they are equal."""

    symbols: int
    rate: float
    cap: float | None = None


def heavy_tailed_rates(seed: int, exchange: str, count: int, total: float, cap: float) -> list[float]:
    """`count` per-symbol rates, busiest first (so the generated names are ranks), summing to
    `total`, none above `cap`: Pareto(PARETO_SHAPE) weights drawn with the seed, scaled to
    the total; whatever a symbol would have had beyond the cap goes to the others in
    proportion to their weights (water-filling), so the total stays exact."""
    if count < 1 or not total > 0 or not cap > 0:
        raise ValueError("heavy-tailed rates need symbols, a total and a cap > 0")
    if total > cap * count:
        raise ValueError(f"{total} events/s cannot fit {count} symbols capped at {cap}/s")
    rng = _rng(seed, "scale-rates", exchange)
    weights = sorted((rng.paretovariate(PARETO_SHAPE) for _ in range(count)), reverse=True)
    capped = 0
    scale = 0.0
    # Each pass caps at least one more symbol or stops: at most `count` passes.
    for _ in range(count):
        rest = sum(weights[capped:])
        scale = (total - cap * capped) / rest
        newly = capped
        while newly < count and weights[newly] * scale > cap:
            newly += 1
        if newly == capped:
            break
        capped = newly
        if capped == count:  # total == cap * count: every symbol at the cap
            break
    return [cap] * capped + [w * scale for w in weights[capped:]]


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    symbol: str
    base: str  # base asset, upper case
    quote: str  # quote asset, upper case
    mid: float
    tick_exp: int  # tick = 10**-tick_exp
    size_exp: int  # lot = 10**-size_exp
    size_median: float  # base units


def make_specs(seed: int, count: int) -> list[ScaleSpec]:
    rng = _rng(seed, "scale-specs")
    specs = []
    for symbol in scale_symbol_names(count):
        mid = 10 ** rng.uniform(-2.0, math.log10(50_000.0))
        tick_exp = min(max(4 - math.floor(math.log10(mid)), 0), 8)
        size_median = 2000.0 / mid
        size_exp = min(max(3 - math.floor(math.log10(size_median)), 0), 8)
        specs.append(ScaleSpec(symbol, symbol[: -len(QUOTE)].upper(), QUOTE.upper(), mid, tick_exp, size_exp, size_median))
    return specs


# Signed distances from the centre of the levels an event touches, drawn once: negative = bid,
# positive = ask; |d| = 1 + geometric with mean ~3 ticks (mostly near the top).
_OFFSETS_RNG = random.Random(20240611)
OFFSETS = tuple(
    (1 + int(_OFFSETS_RNG.expovariate(1 / 3.0))) * (1 if i % 2 else -1) for i in range(1024)
)


class ScaleBookMaker:
    """Change events of one generated book. Prices are integer ticks around a centre `c`:
    bids below it, asks above it."""

    def __init__(self, spec: ScaleSpec, rng: random.Random, price_decimals: int, amount_decimals: int):
        self.spec = spec
        self.c0 = self.c = max(round(spec.mid * 10**spec.tick_exp), INITIAL_DEPTH + REVERSION + 10)
        self._price_decimals = price_decimals
        self._zero = fixed(0, 0, amount_decimals)
        self._prices: dict[int, str] = {}
        self.sizes = tuple(
            fixed(
                max(1, round(spec.size_median * rng.lognormvariate(0.0, 0.8) * 10**spec.size_exp)),
                spec.size_exp,
                amount_decimals,
            )
            for _ in range(SIZES)
        )
        self.bids: set[int] = set()
        self.asks: set[int] = set()
        self._initial: tuple[list[Level], list[Level]] = ([], [])
        for d in range(1, INITIAL_DEPTH + 1):
            if rng.random() < FILL or d == 1:
                self.bids.add(self.c - d)
                self._initial[0].append((self.price(self.c - d), self.sizes[rng.randrange(SIZES)]))
            if rng.random() < FILL or d == 1:
                self.asks.add(self.c + d)
                self._initial[1].append((self.price(self.c + d), self.sizes[rng.randrange(SIZES)]))

    def price(self, tick: int) -> str:
        text = self._prices.get(tick)
        if text is None:
            text = self._prices[tick] = fixed(tick, self.spec.tick_exp, self._price_decimals)
        return text

    def initial_levels(self) -> tuple[list[Level], list[Level]]:
        return self._initial

    def step(self, rng: random.Random) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """One change event: (bids best first, asks best first), one level per price."""
        r = rng.random
        zero = self._zero
        sizes = self.sizes
        bids, asks = self.bids, self.asks
        changed_bids: dict[int, str] = {}
        changed_asks: dict[int, str] = {}
        n = 1 + int(r() * 5)
        if r() < MOVE_PROBABILITY:
            n -= 1
            if r() < 0.5 - (self.c - self.c0) / (2.0 * REVERSION):
                self.c += 1
                if self.c in asks:
                    asks.discard(self.c)
                    changed_asks[self.c] = zero
            else:
                self.c -= 1
                if self.c in bids:
                    bids.discard(self.c)
                    changed_bids[self.c] = zero
        c = self.c
        for _ in range(n):
            x = r()
            offset = OFFSETS[int(x * 1024)]
            tick = c + offset
            if offset < 0:
                side, changed = bids, changed_bids
            else:
                side, changed = asks, changed_asks
            if tick in changed:
                continue
            # The fraction of x left after picking the offset decides delete vs set.
            if tick in side and (x * 1024) % 1.0 < 0.3 and len(side) > MIN_LEVELS:
                side.discard(tick)
                changed[tick] = zero
            else:
                side.add(tick)
                changed[tick] = sizes[int(r() * SIZES)]
        if not changed_bids and not changed_asks:
            tick = c - 1
            bids.add(tick)
            changed_bids[tick] = sizes[int(r() * SIZES)]
        prices = self._prices
        price = self.price
        out_bids: tuple[Level, ...] = ()
        out_asks: tuple[Level, ...] = ()
        if changed_bids:
            out_bids = tuple([(prices.get(t) or price(t), changed_bids[t]) for t in sorted(changed_bids, reverse=True)])
        if changed_asks:
            out_asks = tuple([(prices.get(t) or price(t), changed_asks[t]) for t in sorted(changed_asks)])
        return out_bids, out_asks


class _Stream:
    """The generator of one exchange: its books, RNG, rate and counters."""

    def __init__(self, exchange: str, rate: float, rng: random.Random):
        self.exchange = exchange
        self.rate = rate
        self.rng = rng
        self.books: list[tuple[ScaleBookMaker, Market]] = []
        # Heavy-tailed rates: running totals of the books' rates, to draw each event's book
        # in proportion to its rate; None: uniformly.
        self.cumulative: list[float] | None = None
        self.generated = 0
        self.skipped = 0

    def run(self, played: float) -> None:
        due = int(played * self.rate) - self.generated - self.skipped
        if due <= 0:
            return
        cap = max(1, int(self.rate * MAX_BACKLOG))
        if due > cap:
            self.skipped += due - cap
            due = cap
        rng = self.rng
        r = rng.random
        books = self.books
        n = len(books)
        cumulative = self.cumulative
        if cumulative is None:
            for _ in range(due):
                maker, market = books[int(r() * n)]
                bids, asks = maker.step(rng)
                market.apply_sorted(bids, asks)
        else:
            total = cumulative[-1]
            pick = bisect.bisect_right
            last = n - 1
            for _ in range(due):
                # min(): r() * total may round up to the total itself.
                maker, market = books[min(pick(cumulative, r() * total), last)]
                bids, asks = maker.step(rng)
                market.apply_sorted(bids, asks)
        self.generated += due


class ScaleSource(PlayedSource):
    """Generated symbols on both exchanges (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        clock: Clock,
        seed: int = 1,
        symbols: int = DEFAULT_SYMBOLS,
        rate: float = DEFAULT_RATE,
        bitstamp_rate: float | None = None,
        speed: float = 1.0,
        loop: bool = True,
        tick: float = DEFAULT_TICK,
        venues: tuple[type[Venue], ...] = VENUES,
        loads: Mapping[str, VenueLoad] | None = None,
    ):
        super().__init__()
        if symbols < 1:
            raise ValueError("scale mode needs at least one symbol")
        if not rate > 0:
            raise ValueError("rate must be > 0")
        # Each venue's rate: its share of `rate`; bitstamp_rate (the CLI's --bitstamp-rate)
        # overrides Bitstamp's. With `loads`, each venue's own load; a venue without one lists
        # nothing.
        rates = {venue.name: rate * venue.scale_share for venue in venues}
        listed = {venue.name: symbols for venue in venues}
        if bitstamp_rate is not None:
            rates["bitstamp"] = bitstamp_rate
        if loads is not None:
            unknown = set(loads) - set(rates)
            if unknown:
                raise ValueError(f"loads for unknown venues: {', '.join(sorted(unknown))}")
            if any(load.symbols > symbols or load.symbols < 1 for load in loads.values()):
                raise ValueError(f"every load needs 1 to {symbols} symbols")
            rates = {name: loads[name].rate if name in loads else 0.0 for name in rates}
            listed = {name: loads[name].symbols if name in loads else 0 for name in rates}
        if any(r < 0 for r in rates.values()):
            raise ValueError("bitstamp_rate must be >= 0")
        if not tick > 0:
            raise ValueError("tick must be > 0")
        self._clock = clock
        self.speed = speed
        self.tick = tick
        self.symbol_count = symbols
        self.specs = make_specs(seed, symbols)
        self.listings: dict[str, dict[str, dict]] = {venue.name: {} for venue in venues}
        self._streams = {
            venue.name: _Stream(venue.name, rates[venue.name], _rng(seed, "scale", venue.name)) for venue in venues
        }
        for index, spec in enumerate(self.specs):
            for venue in venues:
                exchange = venue.name
                if index >= listed[exchange]:
                    continue
                rng = _rng(seed, "scale-book", exchange, spec.symbol)
                maker = ScaleBookMaker(spec, rng, *venue.decimals(spec.symbol, spec.tick_exp))
                first_id = venue.first_update_id(rng)
                self.listings[exchange][spec.symbol] = venue.scale_listing(spec)
                bids, asks = maker.initial_levels()
                market = Market(exchange, spec.symbol, clock.seconds, Book(bids, asks), first_id)
                self.markets[(exchange, spec.symbol)] = market
                self._streams[exchange].books.append((maker, market))
        # Per symbol rate of each venue's books, in events per second at speed 1.
        self.symbol_rates: dict[str, dict[str, float]] = {}
        for exchange, stream in self._streams.items():
            names = [market.symbol for _, market in stream.books]
            load = loads.get(exchange) if loads is not None else None
            if load is not None and load.cap is not None:
                per_symbol = heavy_tailed_rates(seed, exchange, len(names), load.rate, load.cap)
                stream.cumulative = list(itertools.accumulate(per_symbol))
            else:
                per_symbol = [stream.rate / len(names)] * len(names) if names else []
            self.symbol_rates[exchange] = dict(zip(names, per_symbol))
        self._duration = None if loop else FINITE_CHANGES * symbols / rate
        self.played = 0.0  # scale seconds generated so far
        self._last = 0.0
        self._loop: LoopingCall | None = None
        self._started = False
        self._paused = False
        self._finished = False
        # Called after each tick's events (batch-mode venues write what they hold back).
        self.tick_listeners: list[Callable[[], Any]] = []

    # ------------------------------------------------------------ PlayedSource

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._last = self._clock.seconds()
        if not self._finished:
            self._loop = looping_call(self._clock, self.run_tick)
            self._loop.start(self.tick, now=False)

    def stop(self) -> None:
        self._started = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def pause(self) -> None:
        if not self._paused:
            self.run_tick()  # generate what was due up to now
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last = self._clock.seconds()

    # ------------------------------------------------------------ generation

    def run_tick(self) -> None:
        """Generate every event due by now (called by the LoopingCall)."""
        now = self._clock.seconds()
        elapsed, self._last = now - self._last, now
        if self._paused or not self._started or self._finished:
            return
        self.played += elapsed * self.speed
        if self._duration is not None and self.played >= self._duration:
            self.played = self._duration
            self._finished = True
        for stream in self._streams.values():
            stream.run(self.played)
        for listener in self.tick_listeners:
            listener()
        if self._finished:
            self.log.info("scale source finished after {s:.1f} s", s=self.played)
            if self._loop is not None and self._loop.running:
                self._loop.stop()
            self._loop = None

    def stats(self) -> dict[str, Any]:
        """Per exchange: target rate, events generated, events skipped because the reactor was
        late, and the achieved rate over the scale time played."""
        out: dict[str, Any] = {"symbols": self.symbol_count, "played": self.played, "tick": self.tick}
        for exchange, stream in self._streams.items():
            out[exchange] = {
                "rate": stream.rate * self.speed,
                "generated": stream.generated,
                "skipped": stream.skipped,
                "achieved_rate": stream.generated / self.played * self.speed if self.played else 0.0,
            }
        return out
