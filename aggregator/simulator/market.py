"""The simulator's ground truth: one order book per exchange+symbol, and its change events.

A `Market` is exchange-neutral: it stores levels as the exact decimal strings the protocol
servers will send, and stamps every change event with both sequencing schemes (Binance update
ids, Bitstamp microtimestamps). Sources write to markets; protocol servers listen to them.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from operator import neg
from typing import Callable, Iterable, NamedTuple, Sequence

from sortedcontainers import SortedDict

# (price, amount) as decimal strings, exactly as sent on the wire. Amount zero = delete.
Level = tuple[str, str]
Listener = Callable[["Update"], None]
# Change events a market remembers, so that a REST snapshot can be served "as of K updates ago"
# (the stale-snapshot fault).
HISTORY = 256


def zero_like(amount: str) -> str:
    """A zero amount written with the same number of decimals as `amount` ("0.00000")."""
    _, dot, frac = amount.partition(".")
    return "0." + "0" * len(frac) if dot else "0"


def fixed(units: int, exponent: int, decimals: int) -> str:
    """Format the integer `units` * 10**-exponent with exactly `decimals` decimals.

    Integer arithmetic, so a synthetic price is always the decimal the source meant (no float
    rounding in the last digit); `decimals` must be >= `exponent`.
    """
    if decimals < exponent:
        raise ValueError(f"cannot write 10**-{exponent} with {decimals} decimals")
    digits = str(units).rjust(exponent + 1, "0")
    whole, frac = (digits[:-exponent], digits[-exponent:]) if exponent else (digits, "")
    frac += "0" * (decimals - exponent)
    return f"{whole}.{frac}" if decimals else whole


class Update(NamedTuple):
    """One change event as applied to a market: everything a protocol needs to describe it.
    (A NamedTuple: immutable and cheap to make, which the scale source needs.)"""

    exchange: str
    symbol: str
    first_id: int  # Binance update-id span U..u of this event
    last_id: int
    microtimestamp: int  # Bitstamp event time (µs), strictly increasing per market
    bids: tuple[Level, ...]  # changed levels, best first, one per price; zero amount = delete
    asks: tuple[Level, ...]


class Book:
    """Both sides of one order book, keyed by the float value of the price (PROTOCOLS §0)."""

    def __init__(self, bids: Iterable[Sequence[str]] = (), asks: Iterable[Sequence[str]] = ()):
        # value = (price string, amount string, amount float); bids sorted by -price, so both
        # sides iterate best-first.
        self._bids: SortedDict = SortedDict(neg)
        self._asks: SortedDict = SortedDict()
        self.apply(bids, asks)

    def copy(self) -> "Book":
        book = Book()
        book._bids.update(self._bids)
        book._asks.update(self._asks)
        return book

    def apply(
        self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]], undo: list | None = None
    ) -> None:
        """Set (or, amount zero, delete) each level. With `undo`, append to it what `revert`
        needs to take this change back."""
        for is_bid, side, levels in ((True, self._bids, bids), (False, self._asks, asks)):
            get = side.get
            for price, amount in levels:
                key = float(price)
                value = float(amount)
                previous = get(key)
                if undo is not None:
                    undo.append((is_bid, key, previous))
                if value == 0:
                    if previous is not None:  # deleting an absent level is normal
                        del side[key]
                elif previous is not None:
                    dict.__setitem__(side, key, (price, amount, value))  # no new key: skip the sorted list
                else:
                    side[key] = (price, amount, value)

    def revert(self, undo: list) -> None:
        """Take back a change recorded by `apply(..., undo)`."""
        for is_bid, key, previous in reversed(undo):
            side = self._bids if is_bid else self._asks
            if previous is None:
                side.pop(key, None)
            else:
                side[key] = previous

    def depth(self) -> tuple[int, int]:
        return len(self._bids), len(self._asks)

    def levels(self, n: int | None = None) -> tuple[list[Level], list[Level]]:
        """Top `n` levels per side (all when None) as strings, best first."""
        return (
            [(p, a) for p, a, _ in islice(self._bids.values(), n)],
            [(p, a) for p, a, _ in islice(self._asks.values(), n)],
        )

    def floats(self, n: int | None = None) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Top `n` levels per side as (price, amount) floats parsed from the strings, best first."""
        return (
            [(k, v[2]) for k, v in islice(self._bids.items(), n)],
            [(k, v[2]) for k, v in islice(self._asks.items(), n)],
        )

    def best(self) -> tuple[float | None, float | None]:
        bid = self._bids.peekitem(0)[0] if self._bids else None
        ask = self._asks.peekitem(0)[0] if self._asks else None
        return bid, ask

    def crossed(self) -> bool:
        bid, ask = self.best()
        return bid is not None and ask is not None and bid >= ask

    def changes_to(self, target: "Book", zero: str) -> tuple[list[Level], list[Level]]:
        """The levels to apply to this book to make it equal to `target` (deletes use `zero`)."""
        result: list[list[Level]] = []
        for mine, theirs in ((self._bids, target._bids), (self._asks, target._asks)):
            changes = [(p, zero) for k, (p, _, _) in mine.items() if k not in theirs]
            for k, (p, a, v) in theirs.items():
                current = mine.get(k)
                if current is None or current[2] != v:
                    changes.append((p, a))
            result.append(changes)
        return result[0], result[1]


class Market:
    """The true book of one exchange+symbol plus the sequencing state of its change events."""

    def __init__(
        self,
        exchange: str,
        symbol: str,
        clock: Callable[[], float],
        book: Book,
        last_update_id: int,
        history: int = HISTORY,
    ):
        self.exchange = exchange
        self.symbol = symbol
        self.book = book
        self.last_update_id = last_update_id
        self._clock = clock
        # A snapshot taken before any change carries the creation time.
        self.last_microtimestamp = int(clock() * 1_000_000)
        self._listeners: list[Listener] = []
        # (last id before, microtimestamp before, undo) of the latest change events.
        self._history: deque | None = deque(maxlen=history) if history > 0 else None

    def subscribe(self, listener: Listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def apply(
        self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]], span: int | None = None
    ) -> Update | None:
        """Apply one change event, give it ids and a microtimestamp, and tell the listeners.

        `span` = how many update ids the event consumes (Binance U..u); default one per level.
        Nothing happens for an empty event: real exchanges never send empty diffs.
        """
        bid_map = {float(p): (p, a) for p, a in bids}
        ask_map = {float(p): (p, a) for p, a in asks}
        if not bid_map and not ask_map:
            return None
        bid_levels = tuple(bid_map[k] for k in sorted(bid_map, reverse=True))
        ask_levels = tuple(ask_map[k] for k in sorted(ask_map))
        return self.apply_sorted(bid_levels, ask_levels, span)

    def apply_sorted(
        self, bid_levels: tuple[Level, ...], ask_levels: tuple[Level, ...], span: int | None = None
    ) -> Update:
        """`apply` for a non-empty event whose levels are already one per price, best first
        (what generators produce): skips the normalisation."""
        span = span if span is not None else len(bid_levels) + len(ask_levels)
        if span < 1:
            raise ValueError("an update spans at least one id")
        first = self.last_update_id + 1
        before = self.last_microtimestamp
        self.last_update_id += span
        # Reactor clock, but strictly increasing per market (hence per channel) even when many
        # events happen within one reactor tick at high speed.
        self.last_microtimestamp = max(int(self._clock() * 1_000_000), before + 1)
        if self._history is not None:
            undo: list = []
            self.book.apply(bid_levels, ask_levels, undo)
            # A tuple of tuples of atoms: the garbage collector stops tracking it.
            self._history.append((first - 1, before, tuple(undo)))
        else:
            self.book.apply(bid_levels, ask_levels)
        update = Update(
            self.exchange,
            self.symbol,
            first,
            self.last_update_id,
            self.last_microtimestamp,
            bid_levels,
            ask_levels,
        )
        for listener in list(self._listeners):
            listener(update)
        return update

    def consume_ids(self, count: int) -> tuple[int, int]:
        """Use up `count` update ids without changing the book (a lost or corrupted message,
        as the skip and bad-frame faults need); returns the first and last id consumed."""
        if count < 1:
            raise ValueError("count must be >= 1")
        first = self.last_update_id + 1
        self.last_update_id += count
        return first, self.last_update_id

    def next_microtimestamp(self) -> int:
        """Take the next microtimestamp without changing the book (a frame that is not a change
        event, e.g. a corrupt one, still keeps a channel's microtimestamps increasing)."""
        self.last_microtimestamp = max(int(self._clock() * 1_000_000), self.last_microtimestamp + 1)
        return self.last_microtimestamp

    @property
    def history_size(self) -> int:
        """How many change events back `as_of` can go."""
        return len(self._history) if self._history is not None else 0

    def as_of(self, updates_ago: int) -> tuple[Book, int, int]:
        """(book, last update id, microtimestamp) as they were `updates_ago` change events ago
        (clamped to the remembered history). Ids consumed without a change are not events."""
        if updates_ago <= 0 or not self._history:
            return self.book.copy(), self.last_update_id, self.last_microtimestamp
        k = min(updates_ago, len(self._history))
        book = self.book.copy()
        entries = list(self._history)[-k:]
        for _, _, undo in reversed(entries):
            book.revert(undo)
        last_id, microtimestamp, _ = entries[0]
        return book, last_id, microtimestamp
