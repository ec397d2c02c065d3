"""Symbol names as clients write them → the one canonical form the core uses."""

from __future__ import annotations

import re

MAX_SYMBOL_LENGTH = 32

_SEPARATORS = re.compile(r"[-/_ .:]")
_CANONICAL = re.compile(r"[a-z0-9]{2,%d}" % MAX_SYMBOL_LENGTH)


class InvalidSymbol(ValueError):
    """Empty or malformed symbol: not worth asking any exchange about."""


def normalize(symbol: str) -> str:
    """"ETHBTC", "eth-btc", "ETH/BTC", "eth_btc" → "ethbtc".

    Checked before any exchange is asked, so nothing a client sends can make
    the daemon look up an arbitrary string.
    """
    if not symbol or not symbol.strip():
        raise InvalidSymbol("symbol is empty")
    if len(symbol) > 2 * MAX_SYMBOL_LENGTH:
        raise InvalidSymbol(f"symbol is longer than {MAX_SYMBOL_LENGTH} characters")
    canonical = _SEPARATORS.sub("", symbol.strip()).lower()
    if not _CANONICAL.fullmatch(canonical):
        raise InvalidSymbol(
            f"malformed symbol {symbol!r}: expected 2-{MAX_SYMBOL_LENGTH} letters "
            "or digits, optionally separated by '-', '/', '_'"
        )
    return canonical
