"""One instrument across venues: each venue's native name → (base, quote) in
canonical asset codes, and the canonical symbol clients ask for.

The canonical symbol is lower-case base + quote (`btcusd`, `ethbtc`). Asset
codes are normalised here (Kraken's `XBT` is `BTC`); `USD` and `USDT` stay
different quotes: no silent equivalence.
"""

from __future__ import annotations

from dataclasses import dataclass

# Venues' own codes for assets everyone else names differently (docs/PROTOCOLS.md §5.3).
ASSET_ALIASES = {"XBT": "BTC", "XDG": "DOGE"}


def canonical_asset(code: str) -> str:
    """A venue's asset code → the canonical, upper-case one."""
    code = code.strip().upper()
    return ASSET_ALIASES.get(code, code)


@dataclass(frozen=True)
class Instrument:
    """One venue's market, as its symbol list describes it."""

    native: str  # as the venue writes it: "BTCUSDT", "BTC-USD", "BTC/USD", "btcusd"
    base: str  # canonical asset codes (canonical_asset)
    quote: str
    # Decimals the venue formats prices and sizes with, where its protocol
    # needs them (Kraken's checksums); None where it does not.
    price_decimals: int | None = None
    size_decimals: int | None = None

    @property
    def symbol(self) -> str:
        return (self.base + self.quote).lower()
