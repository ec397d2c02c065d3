"""Recorded data source: replays the cryptofeed recordings (PROTOCOLS.md §3) as live books.

Binance (nknusdt, blzeth, lrcbtc, runeeur): the initial true book is the recorded depth
snapshot (lastUpdateId L); then the recorded diffs with u > L are applied in order, keeping
their U..u span sizes, so the first pass reproduces the recorded ids exactly (they are
contiguous in the recording, §3.3). Timing: the recorded event times E.

Bitstamp (sgbeur, ethusd, xrpeur, bateur, usdtusd, adaeur): the initial book is the recorded
order_book snapshot (microtimestamp S); then the diffs with microtimestamp > S in arrival order.
Timing: the recorded microtimestamps (the receive stamps are distorted, §3.2). sgbeur has no
diffs: it is served, and never changes.

Looping: TAIL script-seconds after the last diff of a pass, one "reset" change turns the book
back into the initial snapshot (deleting the levels not in it, setting the others), and the
next pass starts. Ids and microtimestamps keep increasing across passes (they come from the
Market, not from the recording).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

from . import fixtures
from .clock import Clock
from .market import Book, Level, Market, zero_like
from .player import PlayedSource, Player, Step

# Script seconds from the last diff of a pass to the reset that begins the next one.
TAIL = 1.0
BINANCE_SYMBOLS = ("nknusdt", "blzeth", "lrcbtc", "runeeur")
BITSTAMP_PAIRS = ("sgbeur", "ethusd", "xrpeur", "bateur", "usdtusd", "adaeur")


@dataclass(frozen=True, slots=True)
class ReplayItem:
    offset: float  # script seconds after the start of a pass
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    span: int | None  # Binance ids consumed; None = one per level


def binance_items(symbol: str) -> tuple[fixtures.BinanceSnapshot, list[ReplayItem]]:
    rec = fixtures.binance_recording()
    snap = rec.snapshots[symbol]
    last = snap.last_update_id
    diffs = [d for d in rec.diffs.get(symbol, ()) if d.last_id > last]
    items = []
    if diffs:
        # The first diff follows the snapshot by what the recording shows (at most 1 s), the
        # others by the gaps between their event times.
        lead = min(max(diffs[0].ts - snap.ts, 0.0), 1.0)
        for d in diffs:
            # A diff straddling L (U <= L < u) would only contribute ids L+1..u.
            span = d.last_id - max(d.first_id, last + 1) + 1
            items.append(ReplayItem(lead + (d.event_time - diffs[0].event_time) / 1000.0, d.bids, d.asks, span))
            last = d.last_id
    return snap, items


def bitstamp_items(pair: str) -> tuple[fixtures.BitstampSnapshot, list[ReplayItem]]:
    rec = fixtures.bitstamp_recording()
    snap = rec.snapshots[pair]
    items = [
        ReplayItem((d.microtimestamp - snap.microtimestamp) / 1e6, d.bids, d.asks, None)
        for d in rec.diffs.get(pair, ())
        if d.microtimestamp > snap.microtimestamp
    ]
    # Arrival order is the order to apply; keep script time monotonic regardless.
    for i in range(1, len(items)):
        if items[i].offset < items[i - 1].offset:
            items[i] = ReplayItem(items[i - 1].offset, items[i].bids, items[i].asks, None)
    return snap, items


class MarketReplay:
    """The replay script of one recorded market."""

    def __init__(self, market: Market, items: list[ReplayItem], loop: bool):
        self.market = market
        self.initial = market.book.copy()
        self.items = items
        self.loop = loop
        self.passes = 0  # completed passes (the last diff of the pass has been applied)
        bids, asks = self.initial.levels(1)
        sample = (bids or asks or [("0", "0")])[0][1]
        self._zero = zero_like(sample)

    def _apply(self, item: ReplayItem, last: bool) -> None:
        self.market.apply(item.bids, item.asks, item.span)
        if last:
            self.passes += 1

    def reset(self) -> None:
        """Turn the true book back into the initial snapshot, as one change event."""
        bids, asks = self.market.book.changes_to(self.initial, self._zero)
        self.market.apply(bids, asks)

    def script(self) -> Iterator[Step]:
        if not self.items:
            return
        cycle = self.items[-1].offset + TAIL
        base = 0.0
        while True:
            for i, item in enumerate(self.items):
                yield base + item.offset, partial(self._apply, item, i == len(self.items) - 1)
            if not self.loop:
                return
            yield base + cycle, self.reset
            base += cycle


class RecordedSource(PlayedSource):
    """Replays the recorded Binance and Bitstamp books (see the module docstring)."""

    def __init__(self, clock: Clock, speed: float = 1.0, loop: bool = True):
        super().__init__()
        self.replays: dict[tuple[str, str], MarketReplay] = {}
        for symbol in BINANCE_SYMBOLS:
            bsnap, items = binance_items(symbol)
            market = Market("binance", symbol, clock.seconds, Book(bsnap.bids, bsnap.asks), bsnap.last_update_id)
            self._add(clock, speed, MarketReplay(market, items, loop))
        for pair in BITSTAMP_PAIRS:
            ssnap, items = bitstamp_items(pair)
            # Ids are meaningless on Bitstamp; microtimestamps come from the reactor clock.
            market = Market("bitstamp", pair, clock.seconds, Book(ssnap.bids, ssnap.asks), 0)
            self._add(clock, speed, MarketReplay(market, items, loop))

    def _add(self, clock: Clock, speed: float, replay: MarketReplay) -> None:
        key = (replay.market.exchange, replay.market.symbol)
        self.markets[key] = replay.market
        self.replays[key] = replay
        self._players.append(Player(clock, replay.script(), speed, f"recorded {key[0]}:{key[1]}"))
