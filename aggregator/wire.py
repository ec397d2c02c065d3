"""Summary → protobuf bytes, written directly.

A Summary is encoded once per change for every client, but on a busy symbol
that is thousands of times a second; building ~20 protobuf Level objects for
each costs more than the merge itself. The format is small and fixed
(proto/orderbook.proto), so it is written here with struct, per the protobuf
encoding rules: fields in number order, proto3 defaults (0, "") omitted.
tests/test_wire.py checks the bytes decode to exactly what the generated
classes build.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Iterable

_DOUBLE = struct.Struct("<d").pack

# (field number << 3) | wire type
_SUMMARY_SPREAD = b"\x09"  # 1, fixed64
_SUMMARY_BIDS = b"\x12"  # 2, length-delimited
_SUMMARY_ASKS = b"\x1a"  # 3, length-delimited
_SUMMARY_EXCHANGES = b"\x22"  # 4, length-delimited
_SUMMARY_TIMESTAMP = b"\x28"  # 5, varint
_LEVEL_PRICE = b"\x11"  # Level.price: 2, fixed64
_LEVEL_AMOUNT = b"\x19"  # Level.amount: 3, fixed64


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_field(tag: bytes, text: str) -> bytes:
    data = text.encode()
    return tag + _varint(len(data)) + data if data else b""


@lru_cache(maxsize=64)
def _exchange_field(exchange: str) -> bytes:
    """Level.exchange (field 1), the same few bytes for every level of an exchange."""
    return _string_field(b"\x0a", exchange)


# price and amount together: the common case (both non-zero) in one pack.
_PRICE_AMOUNT = struct.Struct("<BdBd").pack
_PRICE_AMOUNT_SIZE = 18


@lru_cache(maxsize=128)
def _level_head(tag: bytes, exchange: str) -> bytes:
    """Tag, length and exchange of a Level whose price and amount are non-zero."""
    exchange_field = _exchange_field(exchange)
    return tag + _varint(len(exchange_field) + _PRICE_AMOUNT_SIZE) + exchange_field


def _levels(tag: bytes, levels: Iterable[tuple[str, float, float]]) -> bytes:
    parts = []
    for exchange, price, amount in levels:
        if price and amount:
            parts.append(_level_head(tag, exchange) + _PRICE_AMOUNT(0x11, price, 0x19, amount))
            continue
        body = _exchange_field(exchange)
        if price:
            body += _LEVEL_PRICE + _DOUBLE(price)
        if amount:
            body += _LEVEL_AMOUNT + _DOUBLE(amount)
        parts.append(tag + _varint(len(body)) + body)
    return b"".join(parts)


def _exchange_state(exchange: str, state: int, reason: str) -> bytes:
    body = _exchange_field(exchange)
    if state:
        body += b"\x10" + _varint(state)
    return body + _string_field(b"\x1a", reason)


def _repeated(tag: bytes, messages: Iterable[bytes]) -> bytes:
    return b"".join(tag + _varint(len(m)) + m for m in messages)


def encode_summary(
    spread: float,
    bids: Iterable[tuple[str, float, float]],
    asks: Iterable[tuple[str, float, float]],
    exchanges: Iterable[tuple[str, int, str]] = (),
    timestamp_us: int = 0,
) -> bytes:
    """orderbook.Summary bytes. `exchanges`: (name, ExchangeState.State value, reason)."""
    parts = []
    # NaN != 0, so a NaN spread (an empty side) is written, as protobuf does.
    if spread != 0.0:
        parts.append(_SUMMARY_SPREAD + _DOUBLE(spread))
    parts.append(_levels(_SUMMARY_BIDS, bids))
    parts.append(_levels(_SUMMARY_ASKS, asks))
    parts.append(_repeated(_SUMMARY_EXCHANGES, (_exchange_state(*e) for e in exchanges)))
    if timestamp_us:
        parts.append(_SUMMARY_TIMESTAMP + _varint(timestamp_us))
    return b"".join(parts)


# -- the merger's form -----------------------------------------------------------
# The merger keeps merged levels as sort keys, so that merging books is one
# C-level sort: bids (-price, -amount, exchange), asks (price, -amount,
# exchange). Encoding straight from them spares building a second list of
# tuples per change. Book levels always have a price and an amount (zero
# deletes), so every level takes the one-pack form.


@lru_cache(maxsize=64)
def _bid_head(exchange: str) -> bytes:
    return _level_head(_SUMMARY_BIDS, exchange)


@lru_cache(maxsize=64)
def _ask_head(exchange: str) -> bytes:
    return _level_head(_SUMMARY_ASKS, exchange)


@lru_cache(maxsize=1024)
def encode_exchange_states(exchanges: tuple[tuple[str, int, str], ...]) -> bytes:
    """Summary.exchanges, encoded: the same few states for most Summaries of a symbol."""
    return _repeated(_SUMMARY_EXCHANGES, (_exchange_state(*e) for e in exchanges))


def encode_keyed_summary(
    bid_keys: list[tuple[float, float, str]],
    ask_keys: list[tuple[float, float, str]],
    exchanges: bytes,
    timestamp_us: int,
) -> bytes:
    """encode_summary of merged levels in the merger's key form, with the
    exchanges' states already encoded (encode_exchange_states)."""
    pack = _PRICE_AMOUNT
    parts = []
    if bid_keys and ask_keys:
        spread = ask_keys[0][0] + bid_keys[0][0]  # ask - bid: bid keys hold -price
        if spread != 0.0:
            parts.append(_SUMMARY_SPREAD + _DOUBLE(spread))
    else:
        parts.append(_SUMMARY_SPREAD + _DOUBLE(float("nan")))
    bid_head, ask_head = _bid_head, _ask_head
    parts += [bid_head(name) + pack(0x11, -price, 0x19, -amount) for price, amount, name in bid_keys]
    parts += [ask_head(name) + pack(0x11, price, 0x19, -amount) for price, amount, name in ask_keys]
    parts.append(exchanges)
    if timestamp_us:
        parts.append(_SUMMARY_TIMESTAMP + _varint(timestamp_us))
    return b"".join(parts)
