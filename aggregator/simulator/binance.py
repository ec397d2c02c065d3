"""Binance spot market data, server side (PROTOCOLS.md §1): combined-stream diff depth over
websocket at /stream, and the /api/v3 depth + exchangeInfo REST endpoints.

Only diff depth streams are served: `<symbol>@depth@100ms` and `<symbol>@depth` (1000 ms).
Changes of a symbol are conflated per stream cadence and flushed as one depthUpdate whose U..u
covers exactly the update ids applied since the previous flush.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Mapping

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import fixtures
from .connections import ConnectionSet
from .market import Market, Update

# Lowercase symbol, then the diff-depth suffix; the suffix picks the flush interval (seconds).
STREAM_RE = re.compile(r"^([a-z0-9]+)@depth(@100ms)?$")
INTERVALS = (0.1, 1.0)
SYMBOL_PARAM_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
JSON = b"application/json;charset=UTF-8"  # what api.binance.com sends
# REQUEST_WEIGHT etc. advertised by exchangeInfo; only counted (X-MBX-USED-WEIGHT-1M), not enforced.
RATE_LIMITS = [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]


def parse_stream(name: Any) -> tuple[str, float] | None:
    """(symbol, flush interval) of a served stream name, or None if the name is invalid."""
    if not isinstance(name, str):
        return None
    m = STREAM_RE.match(name)
    if m is None:
        return None
    return m.group(1), (0.1 if m.group(2) else 1.0)


def exchange_info_symbols(served: Iterable[str]) -> list[dict]:
    """exchangeInfo `symbols` entries: the recorded entry of each served symbol (as TRADING),
    plus one recorded BREAK symbol that is not served, so clients can test status filtering."""
    served = sorted(served)
    recorded = fixtures.binance_recording().exchange_info.get("symbols", [])
    template = fixtures.binance_symbol_entry("ETHBTC") or {}
    entries = []
    for symbol in served:
        entry = copy.deepcopy(fixtures.binance_symbol_entry(symbol) or template)
        entry["symbol"] = symbol.upper()
        entry["status"] = "TRADING"
        entries.append(entry)
    served_upper = {s.upper() for s in served}
    for entry in recorded:
        if entry.get("status") == "BREAK" and entry["symbol"] not in served_upper:
            entries.append(copy.deepcopy(entry))
            break
    return entries


class _Pending:
    """Changes of one stream since its last flush: latest level per price, and the id span."""

    __slots__ = ("symbol", "interval", "first_id", "last_id", "bids", "asks")

    def __init__(self, symbol: str, interval: float) -> None:
        self.symbol = symbol
        self.interval = interval
        self.first_id: int | None = None
        self.last_id = 0
        self.bids: dict[float, tuple[str, str]] = {}
        self.asks: dict[float, tuple[str, str]] = {}

    def add(self, update: Update) -> None:
        if self.first_id is None:
            self.first_id = update.first_id
        self.last_id = update.last_id
        for p, a in update.bids:
            self.bids[float(p)] = (p, a)
        for p, a in update.asks:
            self.asks[float(p)] = (p, a)

    def take_frame(self, stream: str, event_ms: int) -> bytes | None:
        if self.first_id is None:
            return None
        payload = {
            "stream": stream,
            "data": {
                "e": "depthUpdate",
                "E": event_ms,
                "s": self.symbol.upper(),
                "U": self.first_id,
                "u": self.last_id,
                "b": [self.bids[k] for k in sorted(self.bids, reverse=True)],
                "a": [self.asks[k] for k in sorted(self.asks)],
            },
        }
        self.first_id = None
        self.bids = {}
        self.asks = {}
        return orjson.dumps(payload)


class DepthHub:
    """Who is subscribed to which depth stream, and the conflated flush of each stream.

    A socket is anything with `sendPreparedMessage(prepared)`; `prepare` turns a frame into what
    they send (Autobahn prepares a frame once for all sockets of a stream).
    """

    log = Logger()

    def __init__(
        self,
        markets: Mapping[str, Market],
        clock: IReactorTime,
        prepare: Callable[[bytes], Any] = lambda frame: frame,
    ):
        self._markets = markets
        self._clock = clock
        self._prepare = prepare
        self._subs: dict[str, dict[Any, None]] = {}  # stream -> sockets (ordered set)
        self._pending: dict[str, _Pending] = {}  # subscribed streams of served symbols
        self._streams_of: dict[str, list[str]] = {}  # symbol -> its entries of _pending
        self._loops: list[LoopingCall] = []
        self._lose: set[str] = set()  # streams whose next frame is to be lost (fault)
        self.frames_sent = 0

    def subscribers(self, stream: str) -> int:
        return len(self._subs.get(stream, ()))

    def subscribe(self, socket: Any, stream: str) -> None:
        parsed = parse_stream(stream)
        if parsed is None:
            raise ValueError(f"invalid stream {stream!r}")
        self._subs.setdefault(stream, {})[socket] = None
        symbol, interval = parsed
        # Well-formed names of unknown symbols are accepted and never get data, like Binance.
        if symbol in self._markets and stream not in self._pending:
            self._pending[stream] = _Pending(symbol, interval)
            self._streams_of.setdefault(symbol, []).append(stream)

    def unsubscribe(self, socket: Any, stream: str) -> None:
        sockets = self._subs.get(stream)
        if sockets is None:
            return
        sockets.pop(socket, None)
        if not sockets:
            del self._subs[stream]
            self._lose.discard(stream)
            pending = self._pending.pop(stream, None)
            if pending is not None:
                self._streams_of[pending.symbol].remove(stream)

    def drop(self, socket: Any, streams: Iterable[str]) -> None:
        for stream in list(streams):
            self.unsubscribe(socket, stream)

    def lose_next(self, symbol: str) -> None:
        """Fault: the next frame of each current stream of `symbol` is built but not sent, so
        clients see U jump past their last u (a lost message: they must resync)."""
        self._lose.update(self._streams_of.get(symbol, ()))

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)
        for interval in INTERVALS:
            loop = LoopingCall(self.flush, interval)
            loop.clock = self._clock
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for pending in self._pending.values():
            pending.take_frame("", 0)  # discard: the next frame starts at the next change

    def _on_update(self, update: Update) -> None:
        for stream in self._streams_of.get(update.symbol, ()):
            self._pending[stream].add(update)

    def flush(self, interval: float) -> None:
        """Send one frame per stream of this cadence that changed since its last flush."""
        event_ms = int(self._clock.seconds() * 1000)
        for stream, pending in list(self._pending.items()):
            if pending.interval != interval:
                continue
            frame = pending.take_frame(stream, event_ms)
            if frame is None:
                continue
            if stream in self._lose:
                self._lose.discard(stream)
                self.log.info("fault: lost a frame of {stream}", stream=stream)
                continue
            prepared = self._prepare(frame)
            for socket in list(self._subs.get(stream, ())):
                socket.sendPreparedMessage(prepared)
            self.frames_sent += 1


class BinanceStreamProtocol(WebSocketServerProtocol):
    """One client of wss://stream.binance.com:9443/stream (combined streams only)."""

    # Autobahn uses self.log (a txaio logger) internally: ours gets another name.
    _log = Logger()
    factory: "BinanceWebSocketFactory"

    def connectionMade(self) -> None:
        self.streams: dict[str, None] = {}  # this socket's subscriptions, in order
        self._initial: list[str] = []
        super().connectionMade()
        # Small frames must not wait for delayed ACKs (DESIGN: TCP_NODELAY on the data path).
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.factory.connections.add(self, self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.hub.drop(self, self.streams)
            self.streams.clear()
            self.factory.connections.discard(self)

    def sendPreparedMessage(self, preparedMsg: Any) -> None:
        # Hubs broadcast to every subscriber; once a close handshake has begun, data frames
        # would be a protocol error, so they are skipped here.
        if self.state == self.STATE_OPEN:
            super().sendPreparedMessage(preparedMsg)

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != "/stream":
            # The raw /ws/<stream> form is not simulated.
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "Not Found")
        names = [n for value in request.params.get("streams", []) for n in value.split("/") if n]
        if any(parse_stream(n) is None for n in names):
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "Invalid request: invalid stream")
        self._initial = names
        return None

    def onOpen(self) -> None:
        self._log.debug("binance client {peer} open, streams {streams}", peer=self.peer, streams=self._initial)
        for name in self._initial:
            self._subscribe(name)

    def _subscribe(self, stream: str) -> None:
        if stream not in self.streams:
            self.streams[stream] = None
            self.factory.hub.subscribe(self, stream)

    def _unsubscribe(self, stream: str) -> None:
        if stream in self.streams:
            del self.streams[stream]
            self.factory.hub.unsubscribe(self, stream)

    def _reply(self, message: dict) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(orjson.dumps(message), isBinary=False)

    def _error(self, code: int, msg: str, request_id: Any) -> None:
        self._reply({"error": {"code": code, "msg": msg}, "id": request_id})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            request = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            # No id: the request could not be read.
            self._reply({"error": {"code": 3, "msg": f"Invalid JSON: {e}"}})
            return
        if not isinstance(request, dict):
            self._error(2, "Invalid request: request must be an object", None)
            return
        request_id = request.get("id")
        method = request.get("method")
        params = request.get("params", [])
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            # All or nothing: one bad name rejects the whole request.
            if not isinstance(params, list) or any(parse_stream(p) is None for p in params):
                self._error(2, "Invalid request: invalid stream", request_id)
                return
            for stream in params:
                (self._subscribe if method == "SUBSCRIBE" else self._unsubscribe)(stream)
            self._log.debug("binance client {peer} {method} {params}", peer=self.peer, method=method, params=params)
            self._reply({"result": None, "id": request_id})
        elif method == "LIST_SUBSCRIPTIONS":
            self._reply({"result": list(self.streams), "id": request_id})
        else:
            self._error(2, "Invalid request: unknown method", request_id)


class BinanceWebSocketFactory(WebSocketServerFactory):
    protocol = BinanceStreamProtocol
    noisy = False

    def __init__(self, markets: Mapping[str, Market], reactor: IReactorTime):
        super().__init__(reactor=reactor)
        # Binance pings every 20 s and drops clients that do not pong within a minute (§1.4).
        self.setProtocolOptions(autoPingInterval=20, autoPingTimeout=60, tcpNoDelay=True, webStatus=False)
        self.hub = DepthHub(markets, reactor, self.prepareMessage)
        self.connections = ConnectionSet()

    def drop_clients(self) -> Deferred[None]:
        return self.connections.drop_all()


class BinanceRestResource(Resource):
    """GET /api/v3/exchangeInfo and /api/v3/depth."""

    isLeaf = True

    def __init__(self, markets: Mapping[str, Market], clock: IReactorTime, symbols: list[dict]):
        super().__init__()
        self._markets = markets
        self._clock = clock
        self._symbols = symbols
        self._weight_minute = -1
        self._weight = 0

    def _json(self, request: Request, body: Any, code: int = 200, weight: int = 1) -> bytes:
        minute = int(self._clock.seconds() // 60)
        if minute != self._weight_minute:
            self._weight_minute, self._weight = minute, 0
        self._weight += weight
        request.setResponseCode(code)
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"x-mbx-used-weight-1m", str(self._weight).encode())
        return orjson.dumps(body)

    def _error(self, request: Request, code: int, msg: str) -> bytes:
        return self._json(request, {"code": code, "msg": msg}, 400)

    def render_GET(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        if path == "/api/v3/depth":
            return self._depth(request)
        if path == "/api/v3/exchangeInfo":
            return self._exchange_info(request)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"Not Found"

    @staticmethod
    def _arg(request: Request, name: str) -> str | None:
        values = (request.args or {}).get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def _depth(self, request: Request) -> bytes:
        symbol = self._arg(request, "symbol")
        if not symbol:
            return self._error(request, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if not SYMBOL_PARAM_RE.match(symbol):
            return self._error(
                request, -1100, "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
            )
        market = self._markets.get(symbol.lower())
        if market is None:
            return self._error(request, -1121, "Invalid symbol.")
        raw_limit = self._arg(request, "limit") or "100"
        if not raw_limit.isdigit():
            return self._error(
                request, -1100, "Illegal characters found in parameter 'limit'; legal range is '^[0-9]{1,20}$'."
            )
        limit = min(max(int(raw_limit), 1), 5000)
        weight = 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
        bids, asks = market.book.levels(limit)
        # The true book as of the last id applied, including changes not yet flushed to
        # sockets: their ids are > L, so a client's sync procedure handles them.
        body = {"lastUpdateId": market.last_update_id, "bids": bids, "asks": asks}
        return self._json(request, body, weight=weight)

    def _exchange_info(self, request: Request) -> bytes:
        symbols = self._symbols
        one = self._arg(request, "symbol")
        many = self._arg(request, "symbols")
        if one is not None or many is not None:
            try:
                wanted = [one] if one is not None else orjson.loads(many or "")
            except orjson.JSONDecodeError:
                wanted = None
            if not isinstance(wanted, list) or not all(isinstance(s, str) for s in wanted):
                return self._error(request, -1100, "Illegal characters found in parameter 'symbols'.")
            by_name = {e["symbol"]: e for e in self._symbols}
            if any(s not in by_name for s in wanted):
                return self._error(request, -1121, "Invalid symbol.")
            symbols = [by_name[s] for s in wanted]
        body = {
            "timezone": "UTC",
            "serverTime": int(self._clock.seconds() * 1000),
            "rateLimits": RATE_LIMITS,
            "exchangeFilters": [],
            "symbols": symbols,
        }
        return self._json(request, body, weight=20)
