"""Reading the recorded cryptofeed files in `fixtures/` (grammar in PROTOCOLS.md §3.2).

This product includes software developed by Bryant Moscon (http://www.bryantmoscon.com/):
the recordings come from cryptofeed's sample data, see fixtures/LICENSE.cryptofeed.

Only parsing lives here: what to replay, and when, is `recorded.py`'s job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

import orjson

Level = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a recording. `kind` is open, sent, http, recv or config."""

    kind: str
    url: str | None
    ts: float | None
    body: str


def parse_line(text: str) -> Line:
    if text.startswith("configuration: "):
        return Line("config", None, None, text[len("configuration: ") :])
    if text.startswith(("wss://", "https://", "ws://", "http://")):
        # URLs contain no spaces, so the token after the URL tells the kind.
        url, _, rest = text.partition(" ")
        arrow, _, rest = rest.partition(" ")
        if arrow == "<->":
            return Line("open", url, float(rest), "")
        kind = {"<-": "sent", "->": "http"}.get(arrow)
        if kind is None:
            raise ValueError(f"unknown arrow {arrow!r} in recorded line")
        ts, _, body = rest.partition(": ")
        return Line(kind, url, float(ts), body)
    # Split at the first ": " only: bodies contain ": " themselves.
    ts, sep, body = text.partition(": ")
    if not sep:
        raise ValueError(f"unparseable recorded line {text[:80]!r}")
    return Line("recv", None, float(ts), body)


def read_lines(name: str) -> list[Line]:
    """All non-empty lines of one fixture file, in file order."""
    text = resources.files(__package__).joinpath("fixtures").joinpath(name).read_text("utf-8")
    return [parse_line(t) for t in text.split("\n") if t]


def merge_by_ts(*files: Iterable[Line]) -> list[Line]:
    """Lines of several files of one exchange in TS order; ties keep file order (stable sort).

    Config lines carry no TS and are left out.
    """
    lines = [line for f in files for line in f if line.ts is not None]
    return sorted(lines, key=lambda line: line.ts)  # type: ignore[arg-type, return-value]


def _levels(raw: Iterable[Any]) -> tuple[Level, ...]:
    return tuple((str(p), str(a)) for p, a, *_ in raw)


# ---------------------------------------------------------------- Binance


@dataclass(frozen=True, slots=True)
class BinanceSnapshot:
    ts: float
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@dataclass(frozen=True, slots=True)
class BinanceDiff:
    ts: float
    event_time: int  # E, ms
    first_id: int  # U
    last_id: int  # u
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@dataclass(frozen=True, slots=True)
class BinanceRecording:
    exchange_info: dict
    snapshots: dict[str, BinanceSnapshot]  # lowercase symbol ->
    diffs: dict[str, list[BinanceDiff]]  # lowercase symbol -> every recorded depth diff, in order
    end_ts: float


@functools.cache
def binance_recording() -> BinanceRecording:
    exchange_info: dict = {}
    snapshots: dict[str, BinanceSnapshot] = {}
    diffs: dict[str, list[BinanceDiff]] = {}
    lines = merge_by_ts(read_lines("BINANCE.0"), read_lines("BINANCE.http.0.0"), read_lines("BINANCE.ws.1.0"))
    for line in lines:
        if line.kind == "http":
            url = urlsplit(line.url or "")
            if url.path.endswith("/exchangeInfo"):
                exchange_info = orjson.loads(line.body)
            elif url.path.endswith("/depth"):
                symbol = parse_qs(url.query)["symbol"][0].lower()
                body = orjson.loads(line.body)
                snapshots[symbol] = BinanceSnapshot(
                    line.ts or 0.0, body["lastUpdateId"], _levels(body["bids"]), _levels(body["asks"])
                )
        elif line.kind == "recv":
            frame = orjson.loads(line.body)
            data = frame.get("data", frame)
            if isinstance(data, dict) and data.get("e") == "depthUpdate":
                diffs.setdefault(data["s"].lower(), []).append(
                    BinanceDiff(
                        line.ts or 0.0,
                        data["E"],
                        data["U"],
                        data["u"],
                        _levels(data["b"]),
                        _levels(data["a"]),
                    )
                )
    return BinanceRecording(exchange_info, snapshots, diffs, lines[-1].ts or 0.0)


def binance_symbol_entry(symbol: str) -> dict | None:
    """The recorded exchangeInfo entry of `symbol` (any case), or None."""
    wanted = symbol.upper()
    for entry in binance_recording().exchange_info.get("symbols", ()):
        if entry["symbol"] == wanted:
            return entry
    return None


# ---------------------------------------------------------------- Bitstamp


@dataclass(frozen=True, slots=True)
class BitstampSnapshot:
    ts: float
    microtimestamp: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@dataclass(frozen=True, slots=True)
class BitstampDiff:
    ts: float
    microtimestamp: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@dataclass(frozen=True, slots=True)
class BitstampRecording:
    pairs_info: list
    snapshots: dict[str, BitstampSnapshot]  # url_symbol ->
    diffs: dict[str, list[BitstampDiff]]  # url_symbol -> every recorded diff, in arrival order
    end_ts: float


@functools.cache
def bitstamp_recording() -> BitstampRecording:
    pairs_info: list = []
    snapshots: dict[str, BitstampSnapshot] = {}
    diffs: dict[str, list[BitstampDiff]] = {}
    lines = merge_by_ts(
        read_lines("BITSTAMP.0"), read_lines("BITSTAMP.http.0.0"), read_lines("BITSTAMP.ws.1.0")
    )
    for line in lines:
        if line.kind == "http":
            path = urlsplit(line.url or "").path.rstrip("/")
            if path.endswith("/trading-pairs-info"):
                pairs_info = orjson.loads(line.body)
            elif "/order_book/" in path:
                pair = path.rsplit("/", 1)[1]
                body = orjson.loads(line.body)
                snapshots[pair] = BitstampSnapshot(
                    line.ts or 0.0,
                    int(body["microtimestamp"]),
                    _levels(body["bids"]),
                    _levels(body["asks"]),
                )
        elif line.kind == "recv":
            frame = orjson.loads(line.body)
            channel = frame.get("channel", "")
            if frame.get("event") == "data" and channel.startswith("diff_order_book_"):
                data = frame["data"]
                diffs.setdefault(channel[len("diff_order_book_") :], []).append(
                    BitstampDiff(
                        line.ts or 0.0,
                        int(data["microtimestamp"]),
                        _levels(data["bids"]),
                        _levels(data["asks"]),
                    )
                )
    return BitstampRecording(pairs_info, snapshots, diffs, lines[-1].ts or 0.0)


def bitstamp_pair_entry(pair: str) -> dict | None:
    """The recorded trading-pairs-info entry whose url_symbol is `pair`, or None."""
    for entry in bitstamp_recording().pairs_info:
        if entry["url_symbol"] == pair:
            return entry
    return None


# Quote assets the simulator's own symbol names end with (longest first).
_QUOTES = ("USDT", "USDC", "BTC", "ETH", "EUR", "USD", "GBP")


def split_symbol(symbol: str) -> tuple[str, str]:
    """"btcusdt" → ("BTC", "USDT"): the base and quote of a symbol the
    simulator serves without a recorded listing of it."""
    upper = symbol.upper()
    for quote in _QUOTES:
        if upper.endswith(quote) and len(upper) > len(quote):
            return upper[: -len(quote)], quote
    return upper[:3], upper[3:]
