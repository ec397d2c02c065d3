"""Kraken market data, server side (PROTOCOLS.md §5.3): the websocket v2 `book` channel (any
path) and REST /0/public/AssetPairs.

A client subscribing a pair at depth N gets an acknowledgement, then a snapshot of the top N
levels per side, then an update whenever its top N changes. As on Kraken, an update carries
the changed levels only: a level deleted from the book is sent with qty 0, a level that
enters the top N (a deletion made room) is sent, but a level that an insertion pushed out of
the top N is not deleted: the client truncates its book to N itself. Every message carries
the CRC32 checksum of the top 10 asks then bids, each price and qty written at the pair's
precision (the strings the market holds), `.` and leading zeros removed. Prices and
quantities go on the wire as JSON numbers.

The listing uses Kraken's own names (`XXBTZUSD`, base `XXBT`, wsname `XBT/USD`); the v2
channel names pairs with the aliases resolved (`BTC/USD`). A heartbeat goes to every
connection with a subscription once a second; `{"method":"ping"}` is answered with a pong.

Faults: `lose_next_update` / `skip_updates` lose update frames (Kraken has no sequence
numbers: only the next checksum shows it), `corrupt_next_checksum` sends an update with a
wrong checksum, `stale_snapshot` makes the next subscription's snapshot old (its own checksum
is right, the updates after it are not relative to it), `send_bad_frame` the usual corrupt
frames.
"""

from __future__ import annotations

import copy
import zlib
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import orjson
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .clock import Clock, looping_call
from .faults import BAD_FRAME_KINDS, Violation
from .market import Level, Market, Update
from .rest import RestGate, WeightLimiter
from .venue import Servers, Venue, VenueSetup
from .wsserver import SimServerFactory, SimServerProtocol

if TYPE_CHECKING:
    from .scale import ScaleSpec

DEPTHS = (10, 25, 100, 500, 1000)
CHECKSUM_LEVELS = 10
HEARTBEAT_INTERVAL = 1.0
# Kraken's own prefixes of its older asset codes (the listing's `base` / `quote`).
LEGACY_CODES = {"BTC": "XXBT", "ETH": "XETH", "LTC": "XLTC", "XRP": "XXRP", "USD": "ZUSD",
                "EUR": "ZEUR", "GBP": "ZGBP", "DOGE": "XXDG"}
V1_NAMES = {"BTC": "XBT", "DOGE": "XDG"}  # the listing's wsname still uses these
ALIASES = {v1: v2 for v2, v1 in V1_NAMES.items()}
QUOTES = ("USDT", "USDC", "BTC", "ETH", "EUR", "USD", "GBP")
# REST: Kraken's public endpoints allow about one request a second.
REQUEST_LIMIT = 60
REQUEST_WINDOW = 60.0


def checksum(asks: Iterable[Level], bids: Iterable[Level]) -> int:
    text = "".join(
        price.replace(".", "").lstrip("0") + qty.replace(".", "").lstrip("0")
        for side in (asks, bids)
        for price, qty in side
    )
    return zlib.crc32(text.encode("ascii"))


def split_symbol(symbol: str) -> tuple[str, str]:
    upper = symbol.upper()
    for quote in QUOTES:
        if upper.endswith(quote) and len(upper) > len(quote):
            return upper[: -len(quote)], quote
    return upper[:3], upper[3:]


def decimals_of(text: str) -> int:
    _, _, fraction = text.partition(".")
    return len(fraction)


def pair_entry(base: str, quote: str, pair_decimals: int, lot_decimals: int) -> dict:
    """An AssetPairs entry in Kraken's naming (its result key is base + quote: XXBTZUSD)."""
    legacy_base = LEGACY_CODES.get(base, base)
    legacy_quote = LEGACY_CODES.get(quote, quote)
    ws_base, ws_quote = V1_NAMES.get(base, base), V1_NAMES.get(quote, quote)
    return {
        "altname": ws_base + ws_quote,
        "wsname": f"{ws_base}/{ws_quote}",
        "aclass_base": "currency",
        "base": legacy_base,
        "aclass_quote": "currency",
        "quote": legacy_quote,
        "lot": "unit",
        "pair_decimals": pair_decimals,
        "lot_decimals": lot_decimals,
        "lot_multiplier": 1,
        "ordermin": "0.0001",
        "status": "online",
    }


def v2_name(entry: dict) -> str:
    base, _, quote = entry["wsname"].partition("/")
    return f"{ALIASES.get(base, base)}/{ALIASES.get(quote, quote)}"


def asset_pairs(markets: Mapping[str, Market], listings: Mapping[str, dict]) -> dict[str, dict]:
    """symbol → AssetPairs entry of every served pair: a generated pair's listing, or one made
    with the precision the market's strings are written at."""
    entries = {}
    for symbol, market in sorted(markets.items()):
        if symbol in listings:
            entries[symbol] = copy.deepcopy(listings[symbol])
            continue
        bids, asks = market.book.levels(1)
        level = (bids or asks or [("0", "0")])[0]
        entries[symbol] = pair_entry(*split_symbol(symbol), decimals_of(level[0]), decimals_of(level[1]))
    return entries


def _now(clock: Clock) -> str:
    return datetime.fromtimestamp(clock.seconds(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wire(levels: Iterable[Level]) -> list[dict[str, float]]:
    return [{"price": float(price), "qty": float(qty)} for price, qty in levels]


class View:
    """The top `depth` levels of one pair as its subscribers at that depth were last told."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.sockets: dict[Any, None] = {}
        self.bids: dict[float, Level] = {}
        self.asks: dict[float, Level] = {}

    def reset(self, market: Market) -> None:
        bids, asks = market.book.levels(self.depth)
        self.bids = {float(p): (p, q) for p, q in bids}
        self.asks = {float(p): (p, q) for p, q in asks}

    def advance(self, market: Market, update: Update) -> tuple[list[Level], list[Level]]:
        """The changes that take the subscribers' top `depth` to the market's."""
        bids, asks = market.book.levels(self.depth)
        deleted_bids = {float(p) for p, q in update.bids if float(q) == 0}
        deleted_asks = {float(p) for p, q in update.asks if float(q) == 0}
        bid_changes = _side_changes(self.bids, bids, deleted_bids, update.bids)
        ask_changes = _side_changes(self.asks, asks, deleted_asks, update.asks)
        self.bids = {float(p): (p, q) for p, q in bids}
        self.asks = {float(p): (p, q) for p, q in asks}
        return bid_changes, ask_changes


def _side_changes(
    old: dict[float, Level], new: list[Level], deleted: set[float], changed: Iterable[Level]
) -> list[Level]:
    new_keys = {float(p): (p, q) for p, q in new}
    zero = next((q for _, q in changed if float(q) == 0), "0")
    # Levels gone from the book are deleted; those an insertion pushed below the depth are
    # not (the client truncates).
    changes = [(p, zero) for key, (p, _) in old.items() if key not in new_keys and key in deleted]
    changes += [level for key, level in new_keys.items() if old.get(key) != level]
    return changes


class BookHub:
    """Book subscriptions per pair and depth, and the frames sent on each change."""

    log = Logger()

    def __init__(self, markets: Mapping[str, Market], natives: Mapping[str, str], clock: Clock,
                 prepare: Any = lambda frame: frame):
        self._markets = markets
        self.natives = natives  # symbol → v2 name
        self.symbols = {native: symbol for symbol, native in natives.items()}
        self._clock = clock
        self._prepare = prepare
        self._views: dict[str, dict[int, View]] = {}  # symbol → depth → view
        self._lose: Counter[str] = Counter()
        self._corrupt: Counter[str] = Counter()
        self.stale: dict[str, int] = {}  # symbol → next snapshot this many changes old
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        self.frame_listeners: list[Callable[[str, bytes], None]] = []
        self._heartbeat: LoopingCall | None = None
        self.sockets_with_subscriptions: Callable[[], Iterable[Any]] = lambda: ()

    def subscribed_symbols(self) -> list[str]:
        return sorted(s for s, views in self._views.items() if any(v.sockets for v in views.values()))

    def subscribe(self, socket: Any, symbol: str, depth: int) -> None:
        market = self._markets[symbol]
        view = self._views.setdefault(symbol, {}).get(depth)
        if view is None:
            view = self._views[symbol][depth] = View(depth)
            view.reset(market)
        view.sockets[socket] = None
        ago = self.stale.pop(symbol, 0)
        book = market.as_of(ago)[0] if ago else market.book
        bids, asks = book.levels(depth)
        top_bids, top_asks = book.levels(CHECKSUM_LEVELS)
        frame = self._frame("snapshot", symbol, bids, asks, checksum(top_asks, top_bids))
        socket.sendPreparedMessage(self._prepare(frame))

    def unsubscribe(self, socket: Any, symbol: str, depth: int) -> None:
        views = self._views.get(symbol, {})
        view = views.get(depth)
        if view is not None:
            view.sockets.pop(socket, None)
            if not view.sockets:
                del views[depth]
        if not views:
            self._views.pop(symbol, None)

    def lose_next(self, symbol: str, count: int = 1) -> None:
        self._lose[symbol] += count

    def corrupt_next_checksum(self, symbol: str) -> None:
        self._corrupt[symbol] += 1

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        sent = 0
        bids, _ = self._markets[symbol].book.levels(1)
        price, qty = bids[0] if bids else ("1.0", "1.0")
        level: dict[str, Any] = {"price": float(price), "qty": float(qty)}
        if kind == "nan_price":
            level["price"] = "NaN"
        elif kind == "inf_price":
            level["price"] = "Infinity"
        elif kind == "zero_price":
            level["price"] = 0.0
        elif kind == "negative_amount":
            level["qty"] = -float(qty)
        elif kind == "wrong_types":
            level["price"] = [price]
        data = {"symbol": self.natives[symbol], "bids": [level], "asks": [], "checksum": 0,
                "timestamp": _now(self._clock)}
        frame = orjson.dumps({"channel": "book", "type": "update", "data": [data]})
        if kind == "malformed_json":
            frame = frame[: len(frame) // 2]
        elif kind == "unknown_event":
            frame = orjson.dumps({"channel": "book_v9", "type": "update", "data": [data]})
        for view in self._views.get(symbol, {}).values():
            if view.sockets:
                self._send(view, symbol, frame)
                sent += 1
        return sent

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)
        self._heartbeat = looping_call(self._clock, self._beat)
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

    def _beat(self) -> None:
        frame = self._prepare(b'{"channel":"heartbeat"}')
        for socket in list(self.sockets_with_subscriptions()):
            socket.sendPreparedMessage(frame)

    def _frame(self, kind: str, symbol: str, bids: list[Level], asks: list[Level], crc: int) -> bytes:
        data = {"symbol": self.natives[symbol], "bids": _wire(bids), "asks": _wire(asks),
                "checksum": crc, "timestamp": _now(self._clock)}
        return orjson.dumps({"channel": "book", "type": kind, "data": [data]})

    def _send(self, view: View, symbol: str, frame: bytes) -> None:
        prepared = self._prepare(frame)
        for socket in list(view.sockets):
            socket.sendPreparedMessage(prepared)
        self.frames_sent += 1
        self.frames_by_symbol[symbol] += 1
        for listener in self.frame_listeners:
            listener(symbol, frame)

    def _on_update(self, update: Update) -> None:
        symbol = update.symbol
        views = self._views.get(symbol)
        if not views:
            return
        market = self._markets[symbol]
        top_bids, top_asks = market.book.levels(CHECKSUM_LEVELS)
        crc = checksum(top_asks, top_bids)
        lose = corrupt = False
        for view in list(views.values()):
            bids, asks = view.advance(market, update)
            if not bids and not asks:
                continue  # nothing changed within this depth
            if self._lose[symbol] > 0:
                lose = True
                continue
            if self._corrupt[symbol] > 0:
                corrupt = True
            self._send(view, symbol, self._frame("update", symbol, bids, asks, crc ^ corrupt))
        if lose:
            self.log.info("fault: kraken lost an update of {symbol}", symbol=symbol)
            self._take(self._lose, symbol)
        if corrupt:
            self.log.info("fault: kraken sent a wrong checksum for {symbol}", symbol=symbol)
            self._take(self._corrupt, symbol)

    @staticmethod
    def _take(counter: Counter[str], symbol: str) -> None:
        counter[symbol] -= 1
        if counter[symbol] <= 0:
            del counter[symbol]


class KrakenProtocol(SimServerProtocol):
    """One client of wss://ws.kraken.com/v2."""

    factory: "KrakenWebSocketFactory"

    def connectionMade(self) -> None:
        self.books: dict[str, int] = {}  # symbol → subscribed depth
        super().connectionMade()

    def release(self) -> None:
        for symbol, depth in self.books.items():
            self.factory.hub.unsubscribe(self, symbol, depth)
        self.books.clear()

    def onConnect(self, request: ConnectionRequest) -> None:
        return None

    def onOpen(self) -> None:
        self.reply(orjson.dumps({"channel": "status", "type": "update", "data": [
            {"version": "2.0.0", "system": "online", "api_version": "v2", "connection_id": id(self)}
        ]}))

    def _answer(self, method: str, req_id: Any, time_in: str, **fields: Any) -> None:
        body = {"method": method, **fields, "time_in": time_in, "time_out": _now(self.factory.reactor)}
        if req_id is not None:
            body["req_id"] = req_id
        self.reply(orjson.dumps(body))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        time_in = _now(self.factory.reactor)
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._answer("", None, time_in, success=False, error="Malformed request")
            return
        if not isinstance(message, dict):
            self._answer("", None, time_in, success=False, error="Malformed request")
            return
        method = message.get("method")
        req_id = message.get("req_id")
        if method == "ping":
            self._answer("pong", req_id, time_in)
            return
        params = message.get("params")
        if method not in ("subscribe", "unsubscribe") or not isinstance(params, dict):
            self._answer(str(method), req_id, time_in, success=False, error="Method not found")
            return
        depth = params.get("depth", 10)
        natives = params.get("symbol")
        if params.get("channel") != "book" or depth not in DEPTHS or not isinstance(natives, list):
            self._answer(method, req_id, time_in, success=False, error="Invalid parameters")
            return
        for native in natives:
            self._one(method, req_id, time_in, native, depth)

    def _one(self, method: str, req_id: Any, time_in: str, native: Any, depth: int) -> None:
        hub = self.factory.hub
        symbol = hub.symbols.get(native) if isinstance(native, str) else None
        if symbol is None:
            self._answer(method, req_id, time_in, success=False, symbol=native,
                         error=f"Currency pair not supported {native}")
            return
        result = {"channel": "book", "depth": depth, "symbol": native}
        if method == "subscribe":
            if symbol in self.books:
                self._answer(method, req_id, time_in, success=False, symbol=native,
                             error="Already subscribed")
                return
            self.books[symbol] = depth
            self._answer(method, req_id, time_in, success=True,
                         result={**result, "snapshot": True, "warnings": []})
            hub.subscribe(self, symbol, depth)
        else:
            if self.books.get(symbol) != depth:
                self._answer(method, req_id, time_in, success=False, symbol=native,
                             error="Subscription Not Found")
                return
            del self.books[symbol]
            hub.unsubscribe(self, symbol, depth)
            self._answer(method, req_id, time_in, success=True, result=result)


class KrakenWebSocketFactory(SimServerFactory):
    protocol = KrakenProtocol
    exchange = "kraken"

    def __init__(self, markets: Mapping[str, Market], natives: Mapping[str, str], reactor: Clock,
                 on_violation: Callable[[Violation], None] | None = None):
        super().__init__(reactor, on_violation)
        self.setProtocolOptions(tcpNoDelay=True, webStatus=False)
        self.hub = BookHub(markets, natives, reactor, self.prepareMessage)
        self.hub.sockets_with_subscriptions = lambda: (
            p for p in self.open_protocols() if getattr(p, "books", None)
        )


class AssetPairsResource(Resource):
    """GET /0/public/AssetPairs (query strings ignored); other paths: Kraken's JSON error."""

    isLeaf = True

    def __init__(self, pairs: Mapping[str, dict], stale: dict[str, int]):
        super().__init__()
        result = {entry["base"] + entry["quote"]: entry for entry in pairs.values()}
        self._body = orjson.dumps({"error": [], "result": result})
        # The stale-snapshot fault is the websocket hub's (Kraken has no REST book snapshot
        # matching the stream): the hub's dict, shared.
        self.stale = stale

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if (request.path or b"").rstrip(b"/") == b"/0/public/AssetPairs":
            return self._body
        request.setResponseCode(404)
        return orjson.dumps({"error": ["EGeneral:Unknown method"]})


class KrakenVenue(Venue):
    name = "kraken"
    scale_share = 0.2
    synthetic_half_spread = 1.0
    close_reasons = ((1000, ""), (1001, "Going away"))
    synthetic_symbols = frozenset({"btcusd", "ethbtc"})

    def build(self, setup: VenueSetup) -> Servers:
        pairs = asset_pairs(setup.markets, setup.listings)
        natives = {symbol: v2_name(entry) for symbol, entry in pairs.items()}
        ws = KrakenWebSocketFactory(setup.markets, natives, setup.reactor, setup.on_violation)
        resource = AssetPairsResource(pairs, ws.hub.stale)
        gate = RestGate(
            self.name, resource, setup.reactor,
            WeightLimiter(REQUEST_LIMIT, REQUEST_WINDOW, None),
            on_violation=setup.on_violation, control=setup.control,
        )
        self._hub = ws.hub
        return Servers(ws, ws.hub, resource, gate)

    @staticmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        return tick_exp, 8

    @staticmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        return pair_entry(spec.base, spec.quote, spec.tick_exp, 8)

    def lose_next_update(self, symbol: str) -> None:
        # No sequence numbers: the next update's checksum is what shows the loss.
        self._hub.lose_next(symbol)

    def skip_updates(self, symbol: str, count: int) -> None:
        self._hub.lose_next(symbol, count)

    def corrupt_next_checksum(self, symbol: str) -> None:
        """The next update of `symbol` carries a wrong checksum (its levels are right)."""
        self._hub.corrupt_next_checksum(symbol)
