"""Bitstamp market data, server side (PROTOCOLS.md §2): the v2 websocket (any path) with the
order_book_ and diff_order_book_ channels, and the /api/v2 order_book + trading-pairs-info REST
endpoints.

Each change event of a pair is sent at once: diff_order_book_<pair> gets the changed levels,
order_book_<pair> the full top 100 after the change. Nothing is sent on subscribe.
Client heartbeats are answered (unless the connection is stalled, see wsserver).

`BitstampVenue` is the whole venue as SimulatorService sees it (venue.Venue): a new venue's
simulator is one module like this one.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import orjson
from autobahn.websocket.types import ConnectionRequest
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import fixtures
from .clock import Clock
from .faults import BAD_FRAME_KINDS, Violation
from .market import Market, Update
from .rest import RestGate, WeightLimiter
from .venue import Servers, Venue, VenueSetup
from .wsserver import SimServerFactory, SimServerProtocol

if TYPE_CHECKING:
    from .scale import ScaleSpec

# Channel types Bitstamp knows; only the two book channels carry data here, the others are
# acknowledged and stay silent (as an unknown pair does on the real service).
CHANNEL_RE = re.compile(
    r"^(order_book|diff_order_book|detail_order_book|full_order_book|live_trades|live_orders)_([a-z0-9]+)$"
)
TOP = 100  # levels per side in order_book_ messages
ORDER_BOOK_RE = re.compile(r"^/api/v2/order_book/([^/]+)/?$")
PAIRS_INFO_RE = re.compile(r"^/api/v2/trading-pairs-info/?$")
# REST: requests per 10 minutes (PROTOCOLS §2.6); over it 429, no bans.
REQUEST_LIMIT = 10_000
REQUEST_WINDOW = 600.0
# After bts:request_reconnect with close_after, the old connections are closed with this.
MAINTENANCE_CLOSE = (1001, "Server maintenance")
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


def pairs_info(served: Iterable[str], listings: Mapping[str, dict] | None = None) -> list[dict]:
    """trading-pairs-info entries of the served pairs, from `listings` (generated pairs) or
    the recorded list."""
    entries = []
    listings = listings or {}
    for pair in sorted(served):
        entry = listings.get(pair) or fixtures.bitstamp_pair_entry(pair)
        if entry is None:  # not recorded: a plausible entry
            base, quote = fixtures.split_symbol(pair)
            entry = {
                "trading": "Enabled",
                "base_decimals": 8,
                "url_symbol": pair,
                "name": f"{base}/{quote}",
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
        self._lose: Counter[str] = Counter()  # pair -> diff frames still to be lost (fault)
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        # Called with (pair, frame) for every frame built for a channel; for benchmarks.
        self.frame_listeners: list[Callable[[str, bytes], None]] = []

    def subscribers(self, channel: str) -> int:
        return len(self._subs.get(channel, ()))

    def subscribed_symbols(self) -> list[str]:
        """Served pairs with at least one subscribed data channel."""
        pairs = set()
        for channel in self._subs:
            parsed = parse_channel(channel)
            if parsed and parsed[0] in ("order_book", "diff_order_book") and parsed[1] in self._markets:
                pairs.add(parsed[1])
        return sorted(pairs)

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

    def lose_next(self, pair: str, count: int = 1) -> None:
        """Fault: the next `count` diff_order_book_<pair> frames are not sent. Bitstamp has no
        sequence numbers, so clients cannot see it (PROTOCOLS §2.4); their book silently
        diverges. order_book_<pair> (full top 100) is unaffected. Only frames that had a
        subscriber count as lost."""
        self._lose[pair] += count

    def send_bad_frame(self, pair: str, kind: str) -> int:
        """Fault: a corrupt frame (faults.BAD_FRAME_KINDS) on the pair's order_book_ and
        diff_order_book_ channels. Returns the number of channels it went to."""
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        market = self._markets[pair]
        sent = 0
        microtimestamp = market.next_microtimestamp()
        for channel in ("diff_order_book_" + pair, "order_book_" + pair):
            if channel in self._subs:
                self._send(channel, pair, bad_frame(kind, channel, market, microtimestamp))
                sent += 1
        return sent

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)

    def _send(self, channel: str, pair: str, frame: bytes) -> None:
        prepared = self._prepare(frame)
        for socket in list(self._subs.get(channel, ())):
            socket.sendPreparedMessage(prepared)
        self.frames_sent += 1
        self.frames_by_symbol[pair] += 1
        for listener in self.frame_listeners:
            listener(pair, frame)

    def _on_update(self, update: Update) -> None:
        pair = update.symbol
        diff = "diff_order_book_" + pair
        if self._lose[pair] > 0 and diff in self._subs:
            self._lose[pair] -= 1
            if not self._lose[pair]:
                del self._lose[pair]
            self.log.info("fault: bitstamp lost a frame of {channel}", channel=diff)
        elif diff in self._subs:
            self._send(diff, pair, data_frame(diff, update.microtimestamp, update.bids, update.asks))
        full = "order_book_" + pair
        if full in self._subs:
            bids, asks = self._markets[pair].book.levels(TOP)
            self._send(full, pair, data_frame(full, update.microtimestamp, bids, asks))


def bad_frame(kind: str, channel: str, market: Market, microtimestamp: int) -> bytes:
    """A corrupt data frame for `channel` (faults.BAD_FRAME_KINDS)."""
    bids, _ = market.book.levels(1)
    price, amount = bids[0] if bids else ("1.00", "1.00000000")
    timestamp, micro = _timestamps(microtimestamp)
    data: dict[str, Any] = {"timestamp": timestamp, "microtimestamp": micro, "bids": [], "asks": []}
    if kind == "malformed_json":
        data["bids"] = [[price, amount]]
        text = orjson.dumps({"data": data, "channel": channel, "event": "data"})
        return text[: len(text) // 2]
    if kind == "nan_price":
        data["bids"] = [["NaN", amount]]
    elif kind == "inf_price":
        data["bids"] = [["Infinity", amount]]
    elif kind == "zero_price":
        data["bids"] = [["0", amount]]
    elif kind == "negative_amount":
        data["bids"] = [[price, "-" + amount]]
    elif kind == "wrong_types":
        data["microtimestamp"] = [micro]
        data["bids"] = [[[price], 1.0]]
    elif kind == "unknown_event":
        return orjson.dumps({"event": "bts:order_book_v9", "channel": channel, "data": {}})
    else:
        raise ValueError(f"unknown bad frame kind {kind!r}")
    return orjson.dumps({"data": data, "channel": channel, "event": "data"})


class BitstampProtocol(SimServerProtocol):
    """One client of wss://ws.bitstamp.net."""

    factory: "BitstampWebSocketFactory"

    def connectionMade(self) -> None:
        self.channels: dict[str, None] = {}
        super().connectionMade()

    def release(self) -> None:
        self.factory.hub.drop(self, self.channels)
        self.channels.clear()

    def onConnect(self, request: ConnectionRequest) -> None:
        return None  # any path: the real endpoint is used as "/" or without a path

    def _reply(self, event: str, channel: str, data: Any) -> None:
        self.reply(orjson.dumps({"event": event, "channel": channel, "data": data}))

    def _error(self, message: str) -> None:
        self._reply("bts:error", "", {"code": None, "message": message})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
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


class BitstampWebSocketFactory(SimServerFactory):
    protocol = BitstampProtocol
    exchange = "bitstamp"
    reconnect_close = MAINTENANCE_CLOSE

    def __init__(
        self,
        markets: Mapping[str, Market],
        reactor: Clock,
        on_violation: Callable[[Violation], None] | None = None,
    ):
        super().__init__(reactor, on_violation)
        # Bitstamp does not ping (heartbeats are client-initiated, §2.5).
        self.setProtocolOptions(tcpNoDelay=True, webStatus=False)
        self.hub = ChannelHub(markets, self.prepareMessage)
        self._close_calls: list[Any] = []

    def request_reconnect(self, close_after: float | None = None) -> int:
        """Send bts:request_reconnect (maintenance, §2.5) to every open client. The connections
        stay open and keep getting data, so a client can open its new connection first
        (make-before-break); with `close_after`, they are closed that many seconds later.
        Returns how many clients were asked."""
        frame = orjson.dumps({"event": "bts:request_reconnect", "channel": "", "data": ""})
        asked = []
        for protocol in self.open_protocols():
            if protocol.state == protocol.STATE_OPEN:
                protocol.reply(frame)
                asked.append(protocol)
        if close_after is not None and asked:
            self._close_calls = [c for c in self._close_calls if c.active()]
            self._close_calls.append(self.reactor.callLater(close_after, self._close_old, asked))
        return len(asked)

    def _close_old(self, protocols: list[SimServerProtocol]) -> None:
        for protocol in protocols:
            protocol.close_with(*self.reconnect_close)

    def stop(self) -> None:
        super().stop()
        for call in self._close_calls:
            if call.active():
                call.cancel()
        self._close_calls = []


class BitstampRestResource(Resource):
    """GET /api/v2/trading-pairs-info/ and /api/v2/order_book/<pair>/ (query strings ignored)."""

    isLeaf = True

    def __init__(self, markets: Mapping[str, Market], pairs: list[dict]):
        super().__init__()
        self._markets = markets
        # Bitstamp's REST JSON has spaces after ',' and ':' (unlike its websocket frames);
        # stdlib json's defaults write exactly that.
        self._pairs_body = json.dumps(pairs).encode()
        # pair -> updates ago: the next snapshot of that pair is served stale (fault).
        self.stale: dict[str, int] = {}

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
        updates_ago = self.stale.pop(market.symbol, 0)
        if updates_ago:
            # Fault: the book and microtimestamp as they were some change events ago.
            book, _, microtimestamp = market.as_of(updates_ago)
            bids, asks = book.levels()
        else:
            microtimestamp = market.last_microtimestamp
            bids, asks = market.book.levels()
        timestamp, micro = _timestamps(microtimestamp)
        body = {"timestamp": timestamp, "microtimestamp": micro, "bids": bids, "asks": asks}
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


class BitstampVenue(Venue):
    name = "bitstamp"
    scale_share = 0.1
    synthetic_half_spread = 1.2
    close_reasons = (MAINTENANCE_CLOSE,)
    asks_reconnect = True

    def build(self, setup: VenueSetup) -> Servers:
        ws = BitstampWebSocketFactory(setup.markets, setup.reactor, on_violation=setup.on_violation)
        resource = BitstampRestResource(setup.markets, pairs_info(setup.markets, setup.listings))
        gate = RestGate(
            self.name,
            resource,
            setup.reactor,
            WeightLimiter(setup.limits.bitstamp_request_limit, REQUEST_WINDOW, None),
            on_violation=setup.on_violation,
            control=setup.control,
        )
        # Typed as what they are (Servers only promises the venue interface): the faults need them.
        self._channels = ws.hub
        self._ws = ws
        return Servers(ws, ws.hub, resource, gate)

    @staticmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        # A recorded pair is written with its listed decimals, a generated one to its tick.
        entry = fixtures.bitstamp_pair_entry(symbol)
        if entry is None:
            return tick_exp, 8
        return int(entry.get("counter_decimals", 8)), int(entry.get("base_decimals", 8))

    @staticmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        return {
            "trading": "Enabled",
            "base_decimals": 8,
            "url_symbol": spec.symbol,
            "name": f"{spec.base}/{spec.quote}",
            "instant_and_market_orders": "Enabled",
            "minimum_order": f"10.0 {spec.quote}",
            "counter_decimals": spec.tick_exp,
            "description": f"{spec.base} / Tether",
        }

    def lose_next_update(self, symbol: str) -> None:
        # diff_order_book_ loses a frame; Bitstamp has no sequence numbers to show it.
        self._channels.lose_next(symbol)

    def skip_updates(self, symbol: str, count: int) -> None:
        # No ids to skip: the gap is `count` lost diff_order_book_ frames.
        self._channels.lose_next(symbol, count)

    def request_reconnect(self, close_after: float | None) -> int:
        return self._ws.request_reconnect(close_after)
