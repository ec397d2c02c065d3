"""Binance spot market data, server side (PROTOCOLS.md §1): combined-stream diff depth over
websocket at /stream, and the /api/v3 depth + exchangeInfo REST endpoints.

Only diff depth streams are served: `<symbol>@depth@100ms` and `<symbol>@depth` (1000 ms).
Normally the changes of a symbol are conflated per stream cadence and flushed as one
depthUpdate whose U..u covers exactly the update ids applied since the previous flush. In batch
mode (the scale source) every change event is its own frame, written at the end of the reactor
tick that produced it, and carries the simulator's send time (SEND_TIME_FIELD).

Binance's rules are enforced as the exchange does (§1.3, §1.4): at most 5 client frames per
second per connection, pings and pongs included (one more: close 1008 "Too many messages");
at most 1024 streams per connection (error code 4 "Too many subscriptions"); a ping every
20 s that must be answered within 60 s (else close 1008 "Pong timeout"); connections closed
after 24 h (1001 "24h connection limit").
"""

from __future__ import annotations

import copy
import re
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import orjson
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import fixtures
from .faults import BAD_FRAME_KINDS, REASON_24H, REASON_TOO_MANY_MESSAGES, Violation
from .market import Market, Update
from .wsserver import SimServerFactory, SimServerProtocol, ws_frame

# Lowercase symbol, then the diff-depth suffix; the suffix picks the flush interval (seconds).
STREAM_RE = re.compile(r"^([a-z0-9]+)@depth(@100ms)?$")
INTERVALS = (0.1, 1.0)
SYMBOL_PARAM_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
JSON = b"application/json;charset=UTF-8"  # what api.binance.com sends
# Streams per connection (§1.3).
MAX_STREAMS = 1024
# Client frames per second per connection, control frames included (§1.3).
MAX_MESSAGES_PER_SECOND = 5
CONNECTION_LIFETIME = 24 * 3600.0
# The extra field of batch-mode depthUpdate frames: the simulator's time.time() when it
# serialized the frame (seconds, float, µs resolution). Real Binance has no such field;
# clients ignore unknown fields.
SEND_TIME_FIELD = "simSendTime"
# REST request weight budget per minute (§1.6); enforced by rest.RestGate.
WEIGHT_LIMIT = 6000
# REQUEST_WEIGHT etc. advertised by exchangeInfo (the weight limit is replaced by the one in force).
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


def request_weight(path: str, args: Mapping[bytes, list[bytes]] | None) -> int:
    """Binance's request weight of a REST request (§1.6): depth by limit, exchangeInfo 20."""
    if path == "/api/v3/depth":
        raw = ((args or {}).get(b"limit") or [b"100"])[0]
        limit = int(raw) if raw.isdigit() else 100
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    if path == "/api/v3/exchangeInfo":
        return 20
    return 1


def rate_limits(weight_limit: int = WEIGHT_LIMIT) -> list[dict]:
    """exchangeInfo `rateLimits`, advertising the request-weight budget in force."""
    limits = copy.deepcopy(RATE_LIMITS)
    limits[0]["limit"] = weight_limit
    return limits


def exchange_info_symbols(served: Iterable[str], listings: Mapping[str, dict] | None = None) -> list[dict]:
    """exchangeInfo `symbols` entries: the recorded entry of each served symbol (as TRADING),
    or the one given in `listings` (generated symbols), plus one recorded BREAK symbol that is
    not served, so clients can test status filtering."""
    served = sorted(served)
    listings = listings or {}
    recorded = fixtures.binance_recording().exchange_info.get("symbols", [])
    template = fixtures.binance_symbol_entry("ETHBTC") or {}
    entries = []
    for symbol in served:
        entry = copy.deepcopy(listings.get(symbol) or fixtures.binance_symbol_entry(symbol) or template)
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
    """Who is subscribed to which depth stream, and the frames each stream gets.

    A socket is anything with `sendPreparedMessage(prepared)` (conflated mode) or
    `write_frames(list_of_frames)` (batch mode); `prepare` turns a frame into what
    sendPreparedMessage takes (Autobahn prepares a frame once for all sockets of a stream).

    Conflated mode (default): changes are accumulated per stream and flushed on the stream's
    cadence (100 ms or 1000 ms). Batch mode: each change event is one frame, with the
    simulator's send time; frames are written at the end of the reactor tick (`end_tick`,
    called by the source after a batch of changes, or scheduled automatically), each socket's
    frames in one write.
    """

    log = Logger()

    def __init__(
        self,
        markets: Mapping[str, Market],
        clock: IReactorTime,
        prepare: Callable[[bytes], Any] = lambda frame: frame,
        batch: bool = False,
        send_time: Callable[[], float] = time.time,
    ):
        self._markets = markets
        self._clock = clock
        self._prepare = prepare
        self.batch = batch
        self._send_time = send_time
        self._subs: dict[str, dict[Any, None]] = {}  # stream -> sockets (ordered set)
        self._pending: dict[str, _Pending] = {}  # subscribed streams of served symbols
        self._streams_of: dict[str, list[str]] = {}  # symbol -> its entries of _pending
        self._loops: list[LoopingCall] = []
        self._lose: set[str] = set()  # streams whose next frame is to be lost (fault)
        self._queue: list[Any] = []  # batch mode: Update or (stream, symbol, frame), in order
        self._flush_call: Any = None
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        # Called with (symbol, frame) for every frame built for a stream; for benchmarks.
        self.frame_listeners: list[Callable[[str, bytes], None]] = []

    def subscribers(self, stream: str) -> int:
        return len(self._subs.get(stream, ()))

    def subscribed_symbols(self) -> list[str]:
        """Served symbols that have at least one subscribed stream."""
        return sorted(symbol for symbol, streams in self._streams_of.items() if streams)

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

    # ------------------------------------------------------------ faults

    def lose_next(self, symbol: str) -> None:
        """Fault: the next frame of each current stream of `symbol` is built but not sent, so
        clients see U jump past their last u (a lost message: they must resync)."""
        self._lose.update(self._streams_of.get(symbol, ()))

    def skip_ids(self, symbol: str, count: int) -> tuple[int, int]:
        """Fault: `count` update ids of `symbol` are used up by changes nobody will ever see,
        so the next frame's U is past the last u + 1. The true book is unaffected, so a
        resync (new snapshot) gives a correct book. Returns the skipped id range."""
        self.flush_symbol(symbol)
        return self._markets[symbol].consume_ids(count)

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        """Fault: send a corrupt frame (see faults.BAD_FRAME_KINDS) on every current stream
        of `symbol`, after whatever changes are pending. Corruption uses up one update id;
        "unknown_event" uses none. Returns the number of streams it went to."""
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        market = self._markets[symbol]
        self.flush_symbol(symbol)
        if kind == "unknown_event":
            first = last = None
        else:
            first, last = market.consume_ids(1)
        streams = list(self._streams_of.get(symbol, ()))
        for stream in streams:
            self._emit(stream, symbol, bad_frame(kind, stream, market, first, last, self._event_ms()))
        return len(streams)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)
        if self.batch:
            return
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
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._queue = []

    # ------------------------------------------------------------ sending

    def _event_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _on_update(self, update: Update) -> None:
        streams = self._streams_of.get(update.symbol)
        if not streams:
            return
        if self.batch:
            self._queue.append(update)
            self._schedule_end_tick()
            return
        for stream in streams:
            self._pending[stream].add(update)

    def _schedule_end_tick(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.end_tick)

    def _count(self, symbol: str, frame: bytes) -> None:
        self.frames_sent += 1
        self.frames_by_symbol[symbol] += 1
        for listener in self.frame_listeners:
            listener(symbol, frame)

    def _emit(self, stream: str, symbol: str, frame: bytes) -> None:
        """Send one frame to the stream's sockets, in order with everything before it."""
        if self.batch:
            self._queue.append((stream, symbol, frame))
            self._schedule_end_tick()
            return
        prepared = self._prepare(frame)
        for socket in list(self._subs.get(stream, ())):
            socket.sendPreparedMessage(prepared)
        self._count(symbol, frame)

    def _send_pending(self, stream: str, pending: _Pending, event_ms: int) -> None:
        frame = pending.take_frame(stream, event_ms)
        if frame is None:
            return
        if stream in self._lose:
            self._lose.discard(stream)
            self.log.info("fault: lost a frame of {stream}", stream=stream)
            return
        self._emit(stream, pending.symbol, frame)

    def flush(self, interval: float) -> None:
        """Send one frame per stream of this cadence that changed since its last flush."""
        event_ms = self._event_ms()
        for stream, pending in list(self._pending.items()):
            if pending.interval == interval:
                self._send_pending(stream, pending, event_ms)

    def flush_symbol(self, symbol: str) -> None:
        """Send the pending changes of every stream of `symbol` now (conflated mode), so that
        what comes next is not merged into them; in batch mode nothing is pending."""
        if self.batch:
            return
        event_ms = self._event_ms()
        for stream in list(self._streams_of.get(symbol, ())):
            self._send_pending(stream, self._pending[stream], event_ms)

    def end_tick(self) -> None:
        """Batch mode: serialize the queued change events and faults, and write each socket's
        frames in one go."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        queue, self._queue = self._queue, []
        if not queue:
            return
        event_ms = self._event_ms()
        now = self._send_time
        dumps = orjson.dumps
        subs = self._subs
        out: dict[Any, list[bytes]] = {}
        for item in queue:
            if isinstance(item, Update):
                symbol = item.symbol
                frames = []
                for stream in self._streams_of.get(symbol, ()):
                    if stream in self._lose:
                        self._lose.discard(stream)
                        self.log.info("fault: lost a frame of {stream}", stream=stream)
                        continue
                    payload = dumps(
                        {
                            "stream": stream,
                            "data": {
                                "e": "depthUpdate",
                                "E": event_ms,
                                "s": symbol.upper(),
                                "U": item.first_id,
                                "u": item.last_id,
                                "b": item.bids,
                                "a": item.asks,
                                SEND_TIME_FIELD: now(),
                            },
                        }
                    )
                    frames.append((stream, symbol, payload))
            else:
                frames = [item]
            for stream, symbol, payload in frames:
                framed = ws_frame(payload)
                for socket in subs.get(stream, ()):
                    buffer = out.get(socket)
                    if buffer is None:
                        out[socket] = [framed]
                    else:
                        buffer.append(framed)
                self._count(symbol, payload)
        for socket, frames_out in out.items():
            socket.write_frames(frames_out)


def bad_frame(kind: str, stream: str, market: Market, first: int | None, last: int | None, event_ms: int) -> bytes:
    """A corrupt depthUpdate for `stream` (faults.BAD_FRAME_KINDS) carrying ids first..last."""
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
    elif kind == "unknown_event":
        data = {"e": "depthUpdateV9", "E": event_ms, "s": market.symbol.upper()}
    else:
        raise ValueError(f"unknown bad frame kind {kind!r}")
    return orjson.dumps({"stream": stream, "data": data})


class BinanceStreamProtocol(SimServerProtocol):
    """One client of wss://stream.binance.com:9443/stream (combined streams only)."""

    factory: "BinanceWebSocketFactory"

    def connectionMade(self) -> None:
        self.streams: dict[str, None] = {}  # this socket's subscriptions, in order
        self._initial: list[str] = []
        super().connectionMade()

    def release(self) -> None:
        self.factory.hub.drop(self, self.streams)
        self.streams.clear()

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path.rstrip("/") != "/stream":
            # The raw /ws/<stream> form is not simulated.
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "Not Found")
        names = [n for value in request.params.get("streams", []) for n in value.split("/") if n]
        if any(parse_stream(n) is None for n in names):
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "Invalid request: invalid stream")
        if len(set(names)) > MAX_STREAMS:
            self.factory.violation("too_many_streams", f"{len(set(names))} streams in the URL")
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "Too many subscriptions")
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
        self.reply(orjson.dumps(message))

    def _error(self, code: int, msg: str, request_id: Any) -> None:
        self._reply({"error": {"code": code, "msg": msg}, "id": request_id})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return  # e.g. the frame that broke the message-rate limit
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
            if method == "SUBSCRIBE":
                total = len(self.streams.keys() | set(params))
                if total > MAX_STREAMS:
                    self.factory.violation("too_many_streams", f"{self.peer}: {total} streams requested")
                    self._error(4, "Too many subscriptions", request_id)
                    return
            for stream in params:
                (self._subscribe if method == "SUBSCRIBE" else self._unsubscribe)(stream)
            self._log.debug("binance client {peer} {method} {params}", peer=self.peer, method=method, params=params)
            self._reply({"result": None, "id": request_id})
        elif method == "LIST_SUBSCRIPTIONS":
            self._reply({"result": list(self.streams), "id": request_id})
        else:
            self._error(2, "Invalid request: unknown method", request_id)


class BinanceWebSocketFactory(SimServerFactory):
    protocol = BinanceStreamProtocol
    exchange = "binance"
    lifetime_close = (1001, REASON_24H)
    too_many_messages_close = (1008, REASON_TOO_MANY_MESSAGES)

    def __init__(
        self,
        markets: Mapping[str, Market],
        reactor: IReactorTime,
        on_violation: Callable[[Violation], None] | None = None,
        batch: bool = False,
        max_messages_per_second: int | None = MAX_MESSAGES_PER_SECOND,
        connection_lifetime: float | None = CONNECTION_LIFETIME,
    ):
        super().__init__(reactor, on_violation, max_messages_per_second, connection_lifetime)
        # Binance pings every 20 s and closes clients that do not pong within a minute (§1.4);
        # only a pong answers a ping (other traffic does not stand in for it).
        self.setProtocolOptions(
            autoPingInterval=20,
            autoPingTimeout=60,
            autoPingRestartOnAnyTraffic=False,
            tcpNoDelay=True,
            webStatus=False,
        )
        self.hub = DepthHub(markets, reactor, self.prepareMessage, batch=batch)


class BinanceRestResource(Resource):
    """GET /api/v3/exchangeInfo and /api/v3/depth (weights, limits and REST faults are
    rest.RestGate's job)."""

    isLeaf = True

    def __init__(
        self,
        markets: Mapping[str, Market],
        clock: IReactorTime,
        symbols: list[dict],
        weight_limit: int = WEIGHT_LIMIT,
    ):
        super().__init__()
        self._markets = markets
        self._clock = clock
        self._symbols = symbols
        self._rate_limits = rate_limits(weight_limit)
        # symbol -> updates ago: the next snapshot of that symbol is served stale (fault).
        self.stale: dict[str, int] = {}

    def _json(self, request: Request, body: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", JSON)
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
        updates_ago = self.stale.pop(market.symbol, 0)
        if updates_ago:
            # Fault: the book and id as they were some change events ago.
            book, last_id, _ = market.as_of(updates_ago)
            bids, asks = book.levels(limit)
        else:
            # The true book as of the last id applied, including changes not yet flushed to
            # sockets: their ids are > L, so a client's sync procedure handles them.
            bids, asks = market.book.levels(limit)
            last_id = market.last_update_id
        body = {"lastUpdateId": last_id, "bids": bids, "asks": asks}
        return self._json(request, body)

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
            "rateLimits": self._rate_limits,
            "exchangeFilters": [],
            "symbols": symbols,
        }
        return self._json(request, body)
