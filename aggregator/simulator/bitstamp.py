"""Bitstamp market data, server side (PROTOCOLS.md §2): the v2 websocket (any path) with the
order_book_ and diff_order_book_ channels, and the /api/v2 order_book + trading-pairs-info REST
endpoints.

Each change event of a pair is sent at once: diff_order_book_<pair> gets the changed levels,
order_book_<pair> the full top 100 after the change. Nothing is sent on subscribe.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Iterable, Mapping

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import fixtures
from .connections import ConnectionSet
from .market import Market, Update

# Channel types Bitstamp knows; only the two book channels carry data here, the others are
# acknowledged and stay silent (as an unknown pair does on the real service).
CHANNEL_RE = re.compile(
    r"^(order_book|diff_order_book|detail_order_book|full_order_book|live_trades|live_orders)_([a-z0-9]+)$"
)
TOP = 100  # levels per side in order_book_ messages
ORDER_BOOK_RE = re.compile(r"^/api/v2/order_book/([^/]+)/?$")
PAIRS_INFO_RE = re.compile(r"^/api/v2/trading-pairs-info/?$")
NOT_FOUND_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested resource was not found.</p></body></html>\n"
)


def parse_channel(channel: Any) -> tuple[str, str] | None:
    """(kind, pair) of a well-formed channel name, or None."""
    if not isinstance(channel, str):
        return None
    m = CHANNEL_RE.match(channel)
    return (m.group(1), m.group(2)) if m else None


def pairs_info(served: Iterable[str]) -> list[dict]:
    """trading-pairs-info entries of the served pairs, from the recorded list."""
    entries = []
    for pair in sorted(served):
        entry = fixtures.bitstamp_pair_entry(pair)
        if entry is None:  # not recorded: a plausible entry
            entry = {
                "trading": "Enabled",
                "base_decimals": 8,
                "url_symbol": pair,
                "name": pair.upper(),
                "instant_and_market_orders": "Enabled",
                "minimum_order": "20.0",
                "counter_decimals": 8,
                "description": pair.upper(),
            }
        entries.append(copy.deepcopy(entry))
    return entries


def _timestamps(microtimestamp: int) -> tuple[str, str]:
    return str(microtimestamp // 1_000_000), str(microtimestamp)


def data_frame(channel: str, microtimestamp: int, bids: Any, asks: Any) -> bytes:
    timestamp, micro = _timestamps(microtimestamp)
    return orjson.dumps(
        {
            "data": {"timestamp": timestamp, "microtimestamp": micro, "bids": bids, "asks": asks},
            "channel": channel,
            "event": "data",
        }
    )


class ChannelHub:
    """Channel subscriptions, and the frames sent on each change event of a pair."""

    log = Logger()

    def __init__(self, markets: Mapping[str, Market], prepare: Any = lambda frame: frame):
        self._markets = markets
        self._prepare = prepare
        self._subs: dict[str, dict[Any, None]] = {}  # channel -> sockets (ordered set)
        self._lose: set[str] = set()  # pairs whose next diff frame is to be lost (fault)
        self.frames_sent = 0

    def subscribers(self, channel: str) -> int:
        return len(self._subs.get(channel, ()))

    def subscribe(self, socket: Any, channel: str) -> None:
        self._subs.setdefault(channel, {})[socket] = None

    def unsubscribe(self, socket: Any, channel: str) -> None:
        sockets = self._subs.get(channel)
        if sockets is not None:
            sockets.pop(socket, None)
            if not sockets:
                del self._subs[channel]

    def drop(self, socket: Any, channels: Iterable[str]) -> None:
        for channel in list(channels):
            self.unsubscribe(socket, channel)

    def lose_next(self, pair: str) -> None:
        """Fault: the next diff_order_book_<pair> frame is not sent. Bitstamp has no sequence
        numbers, so clients cannot see it (PROTOCOLS §2.4); their book silently diverges."""
        self._lose.add(pair)

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)

    def _send(self, channel: str, frame: bytes) -> None:
        prepared = self._prepare(frame)
        for socket in list(self._subs.get(channel, ())):
            socket.sendPreparedMessage(prepared)
        self.frames_sent += 1

    def _on_update(self, update: Update) -> None:
        diff = "diff_order_book_" + update.symbol
        if update.symbol in self._lose:
            self._lose.discard(update.symbol)
            self.log.info("fault: lost a frame of {channel}", channel=diff)
        elif diff in self._subs:
            self._send(diff, data_frame(diff, update.microtimestamp, update.bids, update.asks))
        full = "order_book_" + update.symbol
        if full in self._subs:
            bids, asks = self._markets[update.symbol].book.levels(TOP)
            self._send(full, data_frame(full, update.microtimestamp, bids, asks))


class BitstampProtocol(WebSocketServerProtocol):
    """One client of wss://ws.bitstamp.net."""

    # Autobahn uses self.log (a txaio logger) internally: ours gets another name.
    _log = Logger()
    factory: "BitstampWebSocketFactory"

    def connectionMade(self) -> None:
        self.channels: dict[str, None] = {}
        super().connectionMade()
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.factory.connections.add(self, self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.hub.drop(self, self.channels)
            self.channels.clear()
            self.factory.connections.discard(self)

    def sendPreparedMessage(self, preparedMsg: Any) -> None:
        # Hubs broadcast to every subscriber; once a close handshake has begun, data frames
        # would be a protocol error, so they are skipped here.
        if self.state == self.STATE_OPEN:
            super().sendPreparedMessage(preparedMsg)

    def onConnect(self, request: ConnectionRequest) -> None:
        return None  # any path: the real endpoint is used as "/" or without a path

    def _reply(self, event: str, channel: str, data: Any) -> None:
        if self.state != self.STATE_OPEN:
            return
        self.sendMessage(orjson.dumps({"event": event, "channel": channel, "data": data}), isBinary=False)

    def _error(self, message: str) -> None:
        self._reply("bts:error", "", {"code": None, "message": message})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._error("Incorrect JSON format.")
            return
        if not isinstance(message, dict):
            self._error("Incorrect JSON format.")
            return
        event = message.get("event")
        if event == "bts:heartbeat":
            self._reply("bts:heartbeat", "", {"status": "success"})
            return
        if event not in ("bts:subscribe", "bts:unsubscribe"):
            self._error("Bad subscription string.")
            return
        data = message.get("data")
        channel = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(channel, str) or not channel:
            self._error("Bad subscription string.")
            return
        if parse_channel(channel) is None:
            self._error("Invalid channel provided.")
            return
        if event == "bts:subscribe":
            if channel not in self.channels:
                self.channels[channel] = None
                self.factory.hub.subscribe(self, channel)
            self._reply("bts:subscription_succeeded", channel, {})
        else:
            if channel in self.channels:
                del self.channels[channel]
                self.factory.hub.unsubscribe(self, channel)
            self._reply("bts:unsubscription_succeeded", channel, {})
        self._log.debug("bitstamp client {peer} {event} {channel}", peer=self.peer, event=event, channel=channel)


class BitstampWebSocketFactory(WebSocketServerFactory):
    protocol = BitstampProtocol
    noisy = False

    def __init__(self, markets: Mapping[str, Market], reactor: IReactorTime):
        super().__init__(reactor=reactor)
        # Bitstamp does not ping (heartbeats are client-initiated, §2.5).
        self.setProtocolOptions(tcpNoDelay=True, webStatus=False)
        self.hub = ChannelHub(markets, self.prepareMessage)
        self.connections = ConnectionSet()

    def drop_clients(self) -> Deferred[None]:
        return self.connections.drop_all()

    def request_reconnect(self) -> None:
        """Send bts:request_reconnect (maintenance, §2.5) to every open client."""
        frame = orjson.dumps({"event": "bts:request_reconnect", "channel": "", "data": ""})
        for protocol in self.connections:
            if protocol.state == protocol.STATE_OPEN:
                protocol.sendMessage(frame, isBinary=False)


class BitstampRestResource(Resource):
    """GET /api/v2/trading-pairs-info/ and /api/v2/order_book/<pair>/ (query strings ignored)."""

    isLeaf = True

    def __init__(self, markets: Mapping[str, Market], pairs: list[dict]):
        super().__init__()
        self._markets = markets
        # Bitstamp's REST JSON has spaces after ',' and ':' (unlike its websocket frames);
        # stdlib json's defaults write exactly that.
        self._pairs_body = json.dumps(pairs).encode()

    def render_GET(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        if PAIRS_INFO_RE.match(path):
            request.setHeader(b"content-type", b"application/json")
            return self._pairs_body
        m = ORDER_BOOK_RE.match(path)
        market = self._markets.get(m.group(1)) if m else None
        if market is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return NOT_FOUND_HTML
        timestamp, micro = _timestamps(market.last_microtimestamp)
        bids, asks = market.book.levels()
        body = {"timestamp": timestamp, "microtimestamp": micro, "bids": bids, "asks": asks}
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()
