"""Coinbase Advanced Trade market data, server side (PROTOCOLS.md §5.2): the websocket (any
path) with the `level2` and `heartbeats` channels, and the public product list over REST.

Per socket: every message it is sent carries the socket's own `sequence_num` (0, 1, 2, ...,
across channels). Subscribing a product to `level2` sends its whole book (an event of type
`snapshot`) and then one `update` message per change event, with absolute sizes ("0"
deletes); subscribing a product already subscribed sends no new snapshot (only the
acknowledgement). Each subscribe/unsubscribe is acknowledged on channel `subscriptions`,
listing all of the socket's subscriptions. `heartbeats` sends one message a second. A socket
that subscribes nothing within 5 s is closed (Coinbase's rule; its close code is not
documented, the one used here is ours). Errors: `{"type": "error", "message": ...}`.

Faults (besides the generic stall / drop / close of wsserver): a lost update or skipped
updates use up sequence numbers on every socket carrying the product (a gap, the only thing a
client can see); a bad frame uses one too; `silence_heartbeats` stops the heartbeats of the
open sockets while their data goes on; `close_silently` ends the TCP connections without a
close frame. `stale_snapshot` does not apply: Coinbase's snapshots come in band, consistent
with the stream by construction.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import orjson
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from . import fixtures
from .clock import Clock, DelayedCall, looping_call
from .faults import BAD_FRAME_KINDS, Violation
from .market import Level, Market, Update
from .rest import RestGate, WeightLimiter
from .venue import Servers, Venue, VenueSetup
from .wsserver import SimServerFactory, SimServerProtocol

if TYPE_CHECKING:
    from .scale import ScaleSpec

PRODUCTS_PATH = "/api/v3/brokerage/market/products"
HEARTBEAT_INTERVAL = 1.0
# Seconds a new socket has to send its first subscribe.
SUBSCRIBE_DEADLINE = 5.0
SUBSCRIBE_TIMEOUT_CLOSE = (1008, "subscribe timeout")
# Public REST: about 10 requests per second (PROTOCOLS §5.2, third-party figure).
REQUEST_LIMIT = 10
REQUEST_WINDOW = 1.0


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def product_entry(symbol: str, base: str, quote: str, tick_exp: int = 2) -> dict[str, Any]:
    """A product of the public product list (the fields the adapter reads, and a few more)."""
    increment = f"{10.0 ** -tick_exp:.{tick_exp}f}" if tick_exp > 0 else "1"
    return {
        "product_id": f"{base}-{quote}",
        "price_increment": increment,
        "base_increment": "0.00000001",
        "quote_increment": increment,
        "base_currency_id": base,
        "quote_currency_id": quote,
        "base_display_symbol": base,
        "quote_display_symbol": quote,
        "status": "online",
        "trading_disabled": False,
        "is_disabled": False,
        "cancel_only": False,
        "limit_only": False,
        "post_only": False,
        "auction_mode": False,
        "view_only": False,
        "product_type": "SPOT",
        "alias": "",
        "alias_to": [],
    }


def products(served: Iterable[str], listings: Mapping[str, dict] | None = None) -> list[dict]:
    """The product list of the served symbols: generated listings, else from the symbol."""
    listings = listings or {}
    entries = []
    for symbol in sorted(served):
        entry = listings.get(symbol)
        if entry is None:
            base, quote = fixtures.split_symbol(symbol)
            entry = product_entry(symbol, base, quote)
        entries.append(dict(entry))
    return entries


def wire_levels(side: str, levels: Iterable[Level], at: str) -> list[dict[str, str]]:
    """Levels as level2 `updates`; a zero amount is written "0", as Coinbase does."""
    return [
        {"side": side, "event_time": at, "price_level": price,
         "new_quantity": amount if float(amount) else "0"}
        for price, amount in levels
    ]


class Level2Hub:
    """Which socket carries which product, and the update messages of each change event."""

    log = Logger()

    def __init__(self, markets: Mapping[str, Market], product_ids: Mapping[str, str], clock: Clock):
        self._markets = markets
        self.product_ids = product_ids  # symbol -> product id
        self._clock = clock
        self._subs: dict[str, dict[CoinbaseProtocol, None]] = {}  # symbol -> sockets (ordered)
        self._lose: Counter[str] = Counter()  # symbol -> update messages still to lose (fault)
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        self.frame_listeners: list[Callable[[str, bytes], None]] = []

    def subscribed_symbols(self) -> list[str]:
        return sorted(s for s, sockets in self._subs.items() if sockets and s in self._markets)

    def subscribe(self, socket: CoinbaseProtocol, symbol: str) -> None:
        self._subs.setdefault(symbol, {})[socket] = None

    def unsubscribe(self, socket: CoinbaseProtocol, symbol: str) -> None:
        sockets = self._subs.get(symbol)
        if sockets is not None:
            sockets.pop(socket, None)
            if not sockets:
                del self._subs[symbol]

    def drop(self, socket: CoinbaseProtocol, symbols: Iterable[str]) -> None:
        for symbol in list(symbols):
            self.unsubscribe(socket, symbol)

    def snapshot_events(self, symbol: str) -> list[dict[str, Any]]:
        bids, asks = self._markets[symbol].book.levels()
        at = rfc3339(self._clock.seconds())
        updates = wire_levels("bid", bids, at) + wire_levels("offer", asks, at)
        return [{"type": "snapshot", "product_id": self.product_ids[symbol], "updates": updates}]

    def lose_next(self, symbol: str, count: int = 1) -> None:
        """Fault: the next `count` update messages of the product are not sent; each uses up a
        sequence number on every socket carrying it, so its clients see a gap."""
        self._lose[symbol] += count

    def skip(self, symbol: str, count: int) -> int:
        """Fault: `count` sequence numbers used up by nothing on every socket carrying the
        product (the book is unaffected); returns how many sockets."""
        sockets = list(self._subs.get(symbol, ()))
        for socket in sockets:
            socket.skip(count)
        return len(sockets)

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        """Fault: a corrupt message (faults.BAD_FRAME_KINDS) to every socket carrying the
        product; it uses up a sequence number like any message. Returns how many sockets."""
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        bids, _ = self._markets[symbol].book.levels(1)
        price, amount = bids[0] if bids else ("1.00", "1.00000000")
        sockets = list(self._subs.get(symbol, ()))
        for socket in sockets:
            socket.send_bad(kind, self.product_ids[symbol], price, amount)
        if sockets:
            self.frames_sent += 1
            self.frames_by_symbol[symbol] += 1
        return len(sockets)

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)

    def _on_update(self, update: Update) -> None:
        symbol = update.symbol
        sockets = list(self._subs.get(symbol, ()))
        if not sockets:
            return
        if self._lose[symbol] > 0:
            self._lose[symbol] -= 1
            if not self._lose[symbol]:
                del self._lose[symbol]
            self.log.info("fault: coinbase lost an update of {symbol}", symbol=symbol)
            for socket in sockets:
                socket.skip(1)
            return
        at = rfc3339(update.microtimestamp / 1e6)
        events = orjson.dumps([{
            "type": "update",
            "product_id": self.product_ids[symbol],
            "updates": wire_levels("bid", update.bids, at) + wire_levels("offer", update.asks, at),
        }])
        frame = b""
        for socket in sockets:
            frame = socket.send_channel(b"l2_data", events)
        self.frames_sent += 1
        self.frames_by_symbol[symbol] += 1
        for listener in self.frame_listeners:
            listener(symbol, frame)


class CoinbaseProtocol(SimServerProtocol):
    """One client of wss://advanced-trade-ws.coinbase.com."""

    factory: "CoinbaseWebSocketFactory"

    def connectionMade(self) -> None:
        self.sequence = 0
        self.products: dict[str, None] = {}  # level2 symbols, in subscription order
        self.heartbeat_counter = 0
        self.heartbeats: LoopingCall | None = None
        self.heartbeats_silenced = False
        self._deadline: DelayedCall | None = self.factory.reactor.callLater(
            SUBSCRIBE_DEADLINE, self._no_subscribe
        )
        super().connectionMade()

    def release(self) -> None:
        self.factory.hub.drop(self, self.products)
        self.products.clear()
        if self.heartbeats is not None and self.heartbeats.running:
            self.heartbeats.stop()
        self.heartbeats = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def onConnect(self, request: ConnectionRequest) -> None:
        return None  # the endpoint is used without a path

    # ------------------------------------------------------------ writing

    def _next_sequence(self) -> int:
        sequence = self.sequence
        self.sequence += 1
        return sequence

    def send_channel(self, channel: bytes, events: bytes) -> bytes:
        """One message of the socket's sequence (written unless it is closing; a stalled socket
        eats it, and its number is used up all the same). Returns the frame."""
        if self.state != self.STATE_OPEN:
            return b""
        timestamp = rfc3339(self.factory.reactor.seconds()).encode()
        frame = b"".join((
            b'{"channel":"', channel, b'","client_id":"","timestamp":"', timestamp,
            b'","sequence_num":', str(self._next_sequence()).encode(), b',"events":', events, b"}",
        ))
        self.sendMessage(frame, isBinary=False)
        return frame

    def skip(self, count: int) -> None:
        self.sequence += count

    def send_bad(self, kind: str, product_id: str, price: str, amount: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        at = rfc3339(self.factory.reactor.seconds())
        update: dict[str, Any] = {"side": "bid", "event_time": at, "price_level": price,
                                  "new_quantity": amount}
        message: dict[str, Any] = {"channel": "l2_data", "client_id": "", "timestamp": at,
                                   "sequence_num": self._next_sequence()}
        if kind == "nan_price":
            update["price_level"] = "NaN"
        elif kind == "inf_price":
            update["price_level"] = "Infinity"
        elif kind == "zero_price":
            update["price_level"] = "0"
        elif kind == "negative_amount":
            update["new_quantity"] = "-" + amount
        elif kind == "wrong_types":
            message["sequence_num"] = [message["sequence_num"]]
            update = {"side": "bid", "event_time": at, "price_level": [price], "new_quantity": 1.0}
        elif kind == "unknown_event":
            message["channel"] = "l2_data_v9"
        message["events"] = [{"type": "update", "product_id": product_id, "updates": [update]}]
        frame = orjson.dumps(message)
        if kind == "malformed_json":
            frame = frame[: len(frame) // 2]
        self.sendMessage(frame, isBinary=False)

    def _error(self, message: str) -> None:
        self.reply(orjson.dumps({"type": "error", "message": message}))

    def _acknowledge(self) -> None:
        subscriptions: dict[str, list[str]] = {}
        if self.products:
            ids = self.factory.hub.product_ids
            subscriptions["level2"] = [ids[symbol] for symbol in self.products]
        if self.heartbeats is not None:
            subscriptions["heartbeats"] = ["heartbeats"]
        self.send_channel(b"subscriptions", orjson.dumps([{"subscriptions": subscriptions}]))

    def _heartbeat(self) -> None:
        if self.heartbeats_silenced:
            return
        self.heartbeat_counter += 1
        self.send_channel(b"heartbeats", orjson.dumps([{
            "current_time": rfc3339(self.factory.reactor.seconds()),
            "heartbeat_counter": self.heartbeat_counter,
        }]))

    def _no_subscribe(self) -> None:
        self._deadline = None
        self.factory.violation("no_subscribe", f"{self.peer}: nothing subscribed within "
                                               f"{SUBSCRIBE_DEADLINE} s")
        self.close_with(*SUBSCRIBE_TIMEOUT_CLOSE)

    # ------------------------------------------------------------ reading

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._error("malformed JSON")
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            self._error(f"unknown message type {kind!r}")
            return
        channel = message.get("channel")
        if channel == "heartbeats":
            self._subscribed()
            self._heartbeats(kind == "subscribe")
        elif channel == "level2":
            symbols = self._symbols(message.get("product_ids"))
            if symbols is None:
                self._error("Failed to subscribe")
                return
            self._subscribed()
            if kind == "subscribe":
                self._subscribe(symbols)
            else:
                for symbol in symbols:
                    if symbol in self.products:
                        del self.products[symbol]
                        self.factory.hub.unsubscribe(self, symbol)
        else:
            self._error(f"unknown channel {channel!r}")
            return
        self._acknowledge()

    def _subscribed(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _symbols(self, product_ids: Any) -> list[str] | None:
        """The served symbols of a product_ids list; None if it is not one, or names a
        product that is not served."""
        by_id = self.factory.symbols_by_product
        if type(product_ids) is not list or not all(p in by_id for p in product_ids):
            return None
        return [by_id[p] for p in product_ids]

    def _subscribe(self, symbols: list[str]) -> None:
        hub = self.factory.hub
        for symbol in symbols:
            if symbol in self.products:
                continue  # already streaming: no new snapshot
            self.products[symbol] = None
            hub.subscribe(self, symbol)
            self.send_channel(b"l2_data", orjson.dumps(hub.snapshot_events(symbol)))

    def _heartbeats(self, on: bool) -> None:
        if on and self.heartbeats is None:
            self.heartbeats = looping_call(self.factory.reactor, self._heartbeat)
            self.heartbeats.start(HEARTBEAT_INTERVAL, now=False)
        elif not on and self.heartbeats is not None:
            if self.heartbeats.running:
                self.heartbeats.stop()
            self.heartbeats = None


class CoinbaseWebSocketFactory(SimServerFactory):
    protocol = CoinbaseProtocol
    exchange = "coinbase"

    def __init__(
        self,
        markets: Mapping[str, Market],
        product_ids: Mapping[str, str],
        reactor: Clock,
        on_violation: Callable[[Violation], None] | None = None,
    ):
        super().__init__(reactor, on_violation)
        self.setProtocolOptions(tcpNoDelay=True, webStatus=False)
        self.hub = Level2Hub(markets, product_ids, reactor)
        self.symbols_by_product = {product: symbol for symbol, product in product_ids.items()}

    def silence_heartbeats(self) -> int:
        """Fault: the heartbeats of every open socket stop (its data goes on); sockets opened
        later get theirs. Returns how many sockets fell silent."""
        silenced = 0
        for protocol in self.open_protocols():
            if isinstance(protocol, CoinbaseProtocol) and not protocol.heartbeats_silenced:
                protocol.heartbeats_silenced = True
                silenced += 1
        return silenced

    def close_silently(self) -> int:
        """Fault: end every open socket's TCP connection without a websocket close frame.
        Returns how many."""
        closing = [p for p in self.open_protocols() if p.state == p.STATE_OPEN]
        for protocol in closing:
            protocol.transport.loseConnection()
        return len(closing)


class CoinbaseRestResource(Resource):
    """GET /api/v3/brokerage/market/products (query ignored); anything else 404."""

    isLeaf = True

    def __init__(self, entries: list[dict]):
        super().__init__()
        self._body = json.dumps({"products": entries, "num_products": len(entries)}).encode()
        # Servers wants it; no REST book is served, so the stale_snapshot fault has nothing
        # to age (CoinbaseVenue.stale_snapshot).
        self.stale: dict[str, int] = {}

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if (request.path or b"").decode("utf-8", "replace").rstrip("/") == PRODUCTS_PATH:
            return self._body
        request.setResponseCode(404)
        return b'{"error":"NOT_FOUND","error_details":"Not Found","message":"Not Found"}'


class CoinbaseVenue(Venue):
    name = "coinbase"
    scale_share = 0.1
    synthetic_half_spread = 1.0
    # Coinbase documents no close codes; a server going away is the one drawn.
    close_reasons = ((1001, "going away"),)
    synthetic_symbols = frozenset({"btcusd", "ethbtc"})

    log = Logger()

    def build(self, setup: VenueSetup) -> Servers:
        entries = products(setup.markets, setup.listings)
        product_ids = dict(zip(sorted(setup.markets), (e["product_id"] for e in entries)))
        ws = CoinbaseWebSocketFactory(setup.markets, product_ids, setup.reactor,
                                      on_violation=setup.on_violation)
        resource = CoinbaseRestResource(entries)
        gate = RestGate(
            self.name,
            resource,
            setup.reactor,
            WeightLimiter(REQUEST_LIMIT, REQUEST_WINDOW, None),
            on_violation=setup.on_violation,
            control=setup.control,
        )
        # Typed as what they are (Servers only promises the venue interface): the faults need them.
        self._ws = ws
        return Servers(ws, ws.hub, resource, gate)

    @staticmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        return tick_exp, 8

    @staticmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        return product_entry(spec.symbol, spec.base, spec.quote, spec.tick_exp)

    def lose_next_update(self, symbol: str) -> None:
        self._ws.hub.lose_next(symbol)

    def skip_updates(self, symbol: str, count: int) -> None:
        # Sequence numbers are per socket: there is no one range to return.
        self._ws.hub.skip(symbol, count)

    def stale_snapshot(self, symbol: str, updates_ago: int) -> None:
        self.log.info("fault: coinbase has no REST snapshot to serve stale ({symbol})", symbol=symbol)

    def silence_heartbeats(self) -> int:
        return self._ws.silence_heartbeats()

    def close_silently(self) -> int:
        return self._ws.close_silently()
