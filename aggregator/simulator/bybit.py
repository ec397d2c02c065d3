"""Bybit v5 spot market data, server side (PROTOCOLS.md §5.1): the public websocket at
/v5/public/spot with `orderbook.{1,50,200,1000}.{SYMBOL}` topics, and the REST endpoints
/v5/market/instruments-info and /v5/market/orderbook.

Each topic keeps its subscribers' view of the book: the top `depth` levels per side, with an
update id `u` one higher per message. On subscribe the socket gets the reply, then a snapshot
(the current `u`); every change event that alters the topic's window is a delta carrying the
window's differences, levels leaving the window deleted (size "0"), so a client applying the
deltas holds exactly the venue's top `depth`. Depth 1 is snapshot-only. Client pings
(`{"op":"ping"}`) are answered.

Venue faults beyond the generic ones: `skip_updates` (u jumps), `lose_next_update` (a delta
not sent: its u is missing), `send_snapshot` (a snapshot mid-stream, which resets the book),
`restart` (the service restarted: a snapshot with u = 1, counting on from there).

`BybitVenue` is the whole venue as SimulatorService sees it (venue.Venue).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs

import orjson
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .clock import Clock
from .faults import BAD_FRAME_KINDS, CLOSE_GOING_AWAY, Violation
from .market import Book, Market, Update
from .rest import RestGate, WeightLimiter
from .venue import Servers, Venue, VenueSetup
from .wsserver import SimServerFactory, SimServerProtocol

if TYPE_CHECKING:
    from .scale import ScaleSpec

PATH = "/v5/public/spot"
DEPTHS = (1, 50, 200, 1000)
TOPIC_RE = re.compile(r"^orderbook\.(1|50|200|1000)\.([A-Z0-9]+)$")
# Spot accepts at most 10 args per request (§5.1).
MAX_ARGS = 10
# The update id a topic starts at (any but 1, which announces a restart).
FIRST_U = 1000
# REST: 600 requests per 5 s per IP.
REQUEST_LIMIT = 600
REQUEST_WINDOW = 5.0
# REST /v5/market/orderbook: spot's limit range and default.
REST_DEPTH_MAX = 200
REST_DEPTH_DEFAULT = 1


def topic_of(depth: int, symbol: str) -> str:
    return f"orderbook.{depth}.{symbol.upper()}"


def millis(clock: Clock) -> int:
    return int(clock.seconds() * 1000)


def instrument_entry(symbol: str, base: str, quote: str, tick_exp: int = 2) -> dict[str, Any]:
    """An instruments-info entry of a spot pair."""
    tick = "1" if tick_exp == 0 else "0." + "0" * (tick_exp - 1) + "1"
    return {
        "symbol": symbol.upper(),
        "baseCoin": base.upper(),
        "quoteCoin": quote.upper(),
        "innovation": "0",
        "status": "Trading",
        "marginTrading": "utaOnly",
        "lotSizeFilter": {"basePrecision": "0.000001", "quotePrecision": "0.00000001",
                          "minOrderQty": "0.000048", "maxOrderQty": "71.73956243",
                          "minOrderAmt": "1", "maxOrderAmt": "2000000"},
        "priceFilter": {"tickSize": tick},
    }


# The synthetic symbols' (base, quote): "ethbtc" cannot be split by length alone.
SYNTHETIC_PAIRS = {"btcusdt": ("BTC", "USDT"), "ethusdt": ("ETH", "USDT"), "ethbtc": ("ETH", "BTC")}


def instruments_info(served: Iterable[str], listings: Mapping[str, dict]) -> dict[str, Any]:
    entries = []
    for symbol in sorted(served):
        entry = listings.get(symbol)
        if entry is None:
            base, quote = SYNTHETIC_PAIRS.get(symbol) or (symbol[:3], symbol[3:])
            entry = instrument_entry(symbol, base, quote)
        entries.append(entry)
    return {"retCode": 0, "retMsg": "OK", "result": {"category": "spot", "list": entries},
            "retExtInfo": {}, "time": 0}


class Topic:
    """One orderbook topic: its subscribers, update id and the window they hold."""

    def __init__(self, name: str, depth: int, market: Market) -> None:
        self.name = name
        self.depth = depth
        self.market = market
        self.sockets: dict[Any, None] = {}  # an ordered set
        self.u = FIRST_U
        self.view = Book(*market.book.levels(depth))
        self.lose = 0  # deltas still to be lost (fault)

    def refresh(self) -> None:
        """The window as the market has it now (a snapshot is about to be sent)."""
        self.view = Book(*self.market.book.levels(self.depth))

    def changes(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The deltas that take the subscribers' window to the market's; the view follows."""
        target = Book(*self.market.book.levels(self.depth))
        bids, asks = self.view.changes_to(target, "0")
        self.view = target
        return bids, asks

    def message(self, kind: str, bids: Any, asks: Any, clock: Clock) -> bytes:
        now = millis(clock)
        return orjson.dumps({
            "topic": self.name, "type": kind, "ts": now,
            "data": {"s": self.market.symbol.upper(), "b": bids, "a": asks, "u": self.u,
                     "seq": self.market.last_update_id},
            "cts": now,
        })

    def snapshot(self, clock: Clock) -> bytes:
        bids, asks = self.view.levels()
        return self.message("snapshot", bids, asks, clock)


class TopicHub:
    """Topic subscriptions, and the frames sent on each change event of a market."""

    log = Logger()

    def __init__(self, markets: Mapping[str, Market], clock: Clock,
                 prepare: Callable[[bytes], Any] = lambda frame: frame) -> None:
        self._markets = markets
        self._clock = clock
        self._prepare = prepare
        self.topics: dict[str, Topic] = {}
        self._by_symbol: dict[str, list[Topic]] = {}  # each change event looks up its own
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        self.frame_listeners: list[Callable[[str, bytes], None]] = []

    def topic(self, name: str) -> Topic | None:
        """The topic, made on first use; None if it names no served book."""
        topic = self.topics.get(name)
        if topic is None:
            m = TOPIC_RE.match(name)
            market = self._markets.get(m.group(2).lower()) if m else None
            if m is None or market is None:
                return None
            topic = self.topics[name] = Topic(name, int(m.group(1)), market)
            self._by_symbol.setdefault(market.symbol, []).append(topic)
        return topic

    def subscribed_symbols(self) -> list[str]:
        return sorted({t.market.symbol for t in self.topics.values() if t.sockets})

    def subscribe(self, socket: Any, topic: Topic) -> None:
        if not topic.sockets:
            topic.refresh()  # nobody followed it: its window may be old
        topic.sockets[socket] = None
        socket.reply(topic.snapshot(self._clock))

    def unsubscribe(self, socket: Any, topic: Topic) -> None:
        topic.sockets.pop(socket, None)

    def drop(self, socket: Any, topics: Iterable[Topic]) -> None:
        for topic in list(topics):
            self.unsubscribe(socket, topic)

    def _live(self, symbol: str) -> list[Topic]:
        return [t for t in self._by_symbol.get(symbol, ()) if t.sockets]

    # -- faults -------------------------------------------------------------------

    def skip(self, symbol: str, count: int) -> tuple[int, int] | None:
        """`count` update ids of each subscribed topic of `symbol` used up by nothing;
        the first topic's skipped range."""
        skipped = None
        for topic in self._live(symbol):
            skipped = skipped or (topic.u + 1, topic.u + count)
            topic.u += count
        return skipped

    def lose_next(self, symbol: str) -> None:
        for topic in self._live(symbol):
            topic.lose += 1

    def send_snapshot(self, symbol: str) -> int:
        """A snapshot mid-stream on each subscribed topic of `symbol` (with the next u)."""
        topics = self._live(symbol)
        for topic in topics:
            topic.refresh()
            topic.u += 1
            self._send(topic, topic.snapshot(self._clock))
        return len(topics)

    def restart(self, symbol: str | None = None) -> int:
        """The service restarted: every subscribed topic (of `symbol`) sends its snapshot
        with u = 1 and counts on from there."""
        topics = [t for t in self.topics.values() if t.sockets
                  and (symbol is None or t.market.symbol == symbol)]
        for topic in topics:
            topic.refresh()
            topic.u = 1
            self._send(topic, topic.snapshot(self._clock))
        return len(topics)

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        topics = self._live(symbol)
        for topic in topics:
            if kind != "unknown_event":
                topic.u += 1  # as if a real message had been mangled in flight
            self._send(topic, bad_frame(kind, topic, self._clock))
        return len(topics)

    # -- serving ------------------------------------------------------------------

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)

    def _send(self, topic: Topic, frame: bytes) -> None:
        prepared = self._prepare(frame)
        for socket in list(topic.sockets):
            socket.sendPreparedMessage(prepared)
        self.frames_sent += 1
        self.frames_by_symbol[topic.market.symbol] += 1
        for listener in self.frame_listeners:
            listener(topic.market.symbol, frame)

    def _on_update(self, update: Update) -> None:
        for topic in self._live(update.symbol):
            bids, asks = topic.changes()
            if not bids and not asks:
                continue  # the change was outside the window
            topic.u += 1
            if topic.lose > 0:
                topic.lose -= 1
                self.log.info("fault: bybit lost u={u} of {topic}", u=topic.u, topic=topic.name)
            elif topic.depth == 1:
                self._send(topic, topic.snapshot(self._clock))  # level 1 is snapshot-only
            else:
                self._send(topic, topic.message("delta", bids, asks, self._clock))


def bad_frame(kind: str, topic: Topic, clock: Clock) -> bytes:
    """A corrupt message on `topic` (faults.BAD_FRAME_KINDS), carrying its current u."""
    bids, _ = topic.view.levels(1)
    price, size = bids[0] if bids else ("1.00", "1.0")
    if kind == "malformed_json":
        text = topic.message("delta", [[price, size]], [], clock)
        return text[: len(text) // 2]
    if kind == "unknown_event":
        return orjson.dumps({"topic": topic.name, "type": "snapshot_v9", "ts": millis(clock),
                             "data": {"s": topic.market.symbol.upper(), "u": topic.u}})
    levels: dict[str, Any] = {
        "nan_price": [["NaN", size]],
        "inf_price": [["Infinity", size]],
        "zero_price": [["0", size]],
        "negative_amount": [[price, "-" + size]],
        "wrong_types": [[[price], 1.0]],
    }
    if kind not in levels:
        raise ValueError(f"unknown bad frame kind {kind!r}")
    return topic.message("delta", levels[kind], [], clock)


class BybitProtocol(SimServerProtocol):
    """One client of wss://stream.bybit.com/v5/public/spot."""

    factory: "BybitWebSocketFactory"

    def connectionMade(self) -> None:
        self.topics: dict[str, Topic] = {}
        self._by_symbol: dict[str, list[Topic]] = {}  # each change event looks up its own
        self.conn_id = f"sim-{id(self):x}"
        super().connectionMade()

    def release(self) -> None:
        self.factory.hub.drop(self, self.topics.values())
        self.topics.clear()

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != PATH:
            raise ConnectionDeny(404, "Not Found")
        return None

    def _answer(self, op: str, req_id: Any, success: bool, ret_msg: str) -> None:
        answer: dict[str, Any] = {"success": success, "ret_msg": ret_msg, "conn_id": self.conn_id}
        if req_id is not None:
            answer["req_id"] = req_id
        answer["op"] = op
        self.reply(orjson.dumps(answer))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self._answer("", None, False, "error:invalid request")
            return
        op, req_id, args = message.get("op"), message.get("req_id"), message.get("args")
        if op == "ping":
            self._answer("ping", req_id, True, "pong")
        elif op in ("subscribe", "unsubscribe"):
            self._topics_request(op, req_id, args)
        else:
            self._answer(str(op), req_id, False, f"error:unknown op {op!r}")

    def _topics_request(self, op: str, req_id: Any, args: Any) -> None:
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or not args:
            self._answer(op, req_id, False, "error:args must be a list of topics")
            return
        if len(args) > MAX_ARGS:
            self.factory.violation("too_many_args", f"{self.peer}: {op} with {len(args)} args")
            self._answer(op, req_id, False, f"error:args size >{MAX_ARGS}")
            return
        hub = self.factory.hub
        if op == "unsubscribe":
            for name in args:
                topic = self.topics.pop(name, None)
                if topic is not None:
                    hub.unsubscribe(self, topic)
            self._answer(op, req_id, True, "")
            return
        topics = []
        for name in args:
            topic = hub.topic(name)
            if topic is None:
                self._answer(op, req_id, False, f"error:handler not found,topic:{name}")
                return
            if name in self.topics:
                self._answer(op, req_id, False, f"error:already subscribed,topic:{name}")
                return
            topics.append(topic)
        self._answer(op, req_id, True, "")
        for topic in topics:
            self.topics[topic.name] = topic
            hub.subscribe(self, topic)


class BybitWebSocketFactory(SimServerFactory):
    protocol = BybitProtocol
    exchange = "bybit"

    def __init__(self, markets: Mapping[str, Market], reactor: Clock,
                 on_violation: Callable[[Violation], None] | None = None):
        super().__init__(reactor, on_violation)
        # Bybit expects the client to ping (op ping), it does not ping itself (§5.1).
        self.setProtocolOptions(tcpNoDelay=True, webStatus=False)
        self.hub = TopicHub(markets, reactor, self.prepareMessage)


class BybitRestResource(Resource):
    """GET /v5/market/instruments-info and /v5/market/orderbook (category=spot)."""

    isLeaf = True

    def __init__(self, markets: Mapping[str, Market], clock: Clock, info: dict[str, Any]):
        super().__init__()
        self._markets = markets
        self._clock = clock
        self._info = info
        # symbol -> updates ago: the next orderbook answer is served stale (fault).
        self.stale: dict[str, int] = {}

    def render_GET(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        query = parse_qs((request.uri or b"").partition(b"?")[2].decode("utf-8", "replace"))
        request.setHeader(b"content-type", b"application/json")
        if query.get("category") != ["spot"]:
            return self._error(10001, "Illegal category")
        now = millis(self._clock)
        if path == "/v5/market/instruments-info":
            return json.dumps({**self._info, "time": now}).encode()
        if path != "/v5/market/orderbook":
            request.setResponseCode(404)
            return b'{"retCode":10001,"retMsg":"Not Found"}'
        market = self._markets.get(query.get("symbol", [""])[0].lower())
        if market is None:
            return self._error(10001, "Not supported symbols")
        try:
            limit = min(max(int(query.get("limit", [str(REST_DEPTH_DEFAULT)])[0]), 1), REST_DEPTH_MAX)
        except ValueError:
            return self._error(10001, "Illegal limit")
        updates_ago = self.stale.pop(market.symbol, 0)
        book, seq, _ = market.as_of(updates_ago)
        bids, asks = book.levels(limit)
        result = {"s": market.symbol.upper(), "b": bids, "a": asks, "ts": now, "u": seq,
                  "seq": seq, "cts": now}
        return json.dumps({"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {},
                           "time": now}).encode()

    def _error(self, code: int, message: str) -> bytes:
        return json.dumps({"retCode": code, "retMsg": message, "result": {}, "retExtInfo": {},
                           "time": millis(self._clock)}).encode()


class BybitVenue(Venue):
    name = "bybit"
    scale_share = 0.2
    synthetic_half_spread = 0.8
    # Bybit documents no close frames of its own: a plain "going away".
    close_reasons = ((CLOSE_GOING_AWAY, "server shutdown"),)
    synthetic_symbols = frozenset({"btcusdt", "ethusdt", "ethbtc"})

    def build(self, setup: VenueSetup) -> Servers:
        ws = BybitWebSocketFactory(setup.markets, setup.reactor, on_violation=setup.on_violation)
        resource = BybitRestResource(setup.markets, setup.reactor,
                                     instruments_info(setup.markets, setup.listings))
        gate = RestGate(
            self.name,
            resource,
            setup.reactor,
            WeightLimiter(REQUEST_LIMIT, REQUEST_WINDOW, None),
            on_violation=setup.on_violation,
            control=setup.control,
        )
        self._topics = ws.hub  # as what it is: the venue faults need it
        return Servers(ws, ws.hub, resource, gate)

    @staticmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        # Prices to the tick; sizes to basePrecision, which generated lots may need up to 8.
        return tick_exp, 8

    @staticmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        return instrument_entry(spec.symbol, spec.base, spec.quote, spec.tick_exp)

    def lose_next_update(self, symbol: str) -> None:
        self._topics.lose_next(symbol)

    def skip_updates(self, symbol: str, count: int) -> tuple[int, int] | None:
        return self._topics.skip(symbol, count)

    def send_snapshot(self, symbol: str) -> int:
        """Fault: a snapshot in the middle of the stream (Bybit re-sends one after a problem
        on its side): the client must replace its book. Returns how many topics."""
        return self._topics.send_snapshot(symbol)

    def restart(self, symbol: str | None = None) -> int:
        """Fault: the service restarted: snapshots with u = 1 on every subscribed topic (of
        `symbol`). Returns how many topics."""
        return self._topics.restart(symbol)
