"""Binance's websocket wire format (PROTOCOLS.md §1.2): stream names and depthUpdate frames,
well-formed and corrupt."""

from __future__ import annotations

import re
from typing import Any, Sequence

import orjson

from ..faults import BAD_FRAME_KINDS
from ..market import Level, Market

# Lowercase symbol, then the diff-depth suffix; the suffix picks the flush interval (seconds).
STREAM_RE = re.compile(r"^([a-z0-9]+)@depth(@100ms)?$")
INTERVALS = (0.1, 1.0)
# The extra field of batch-mode depthUpdate frames: the simulator's time.time() when it
# serialized the frame (seconds, float, µs resolution). Real Binance has no such field;
# clients ignore unknown fields.
SEND_TIME_FIELD = "simSendTime"


def parse_stream(name: Any) -> tuple[str, float] | None:
    """(symbol, flush interval) of a served stream name, or None if the name is invalid."""
    if not isinstance(name, str):
        return None
    m = STREAM_RE.match(name)
    if m is None:
        return None
    return m.group(1), (0.1 if m.group(2) else 1.0)


def depth_update(
    stream: str,
    symbol: str,
    event_ms: int,
    first_id: int,
    last_id: int,
    bids: Sequence[Level],
    asks: Sequence[Level],
    send_time: float | None = None,
) -> bytes:
    """One combined-stream depthUpdate frame; `send_time` adds SEND_TIME_FIELD (batch mode)."""
    data: dict[str, Any] = {
        "e": "depthUpdate",
        "E": event_ms,
        "s": symbol.upper(),
        "U": first_id,
        "u": last_id,
        "b": bids,
        "a": asks,
    }
    if send_time is not None:
        data[SEND_TIME_FIELD] = send_time
    return orjson.dumps({"stream": stream, "data": data})


def bad_frame(kind: str, stream: str, market: Market, first: int | None, last: int | None, event_ms: int) -> bytes:
    """A corrupt depthUpdate for `stream` (faults.BAD_FRAME_KINDS) carrying ids first..last."""
    if kind not in BAD_FRAME_KINDS:
        raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
    bids, _ = market.book.levels(1)
    price = bids[0][0] if bids else "1.00000000"
    data: dict[str, Any] = {
        "e": "depthUpdate",
        "E": event_ms,
        "s": market.symbol.upper(),
        "U": first,
        "u": last,
        "b": [],
        "a": [],
    }
    if kind == "malformed_json":
        data["b"] = [[price, "1.00000000"]]
        text = orjson.dumps({"stream": stream, "data": data})
        return text[: len(text) // 2]
    if kind == "nan_price":
        data["b"] = [["NaN", "1.00000000"]]
    elif kind == "inf_price":
        data["b"] = [["Infinity", "1.00000000"]]
    elif kind == "zero_price":
        data["b"] = [["0.00000000", "1.00000000"]]
    elif kind == "negative_amount":
        data["b"] = [[price, "-1.00000000"]]
    elif kind == "wrong_types":
        data["b"] = [[[price], 1.0]]
    else:  # unknown_event
        data = {"e": "depthUpdateV9", "E": event_ms, "s": market.symbol.upper()}
    return orjson.dumps({"stream": stream, "data": data})
