"""Binance's combined-stream websocket endpoint (PROTOCOLS.md §1.2-§1.4): the client
requests (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS) and the connection rules.

Binance's rules are enforced as the exchange does (§1.3, §1.4): at most 5 client frames per
second per connection, pings and pongs included (one more: close 1008 "Too many messages");
at most 1024 streams per connection (error code 4 "Too many subscriptions"); a ping every
20 s that must be answered within 60 s (else close 1008 "Pong timeout"); connections closed
after 24 h (1001 "24h connection limit").
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import orjson
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest

from ..clock import Clock
from ..faults import REASON_24H, REASON_TOO_MANY_MESSAGES, Violation
from ..market import Market
from ..wsserver import SimServerFactory, SimServerProtocol
from .hub import DepthHub
from .wire import parse_stream

# Streams per connection (§1.3).
MAX_STREAMS = 1024
# Client frames per second per connection, control frames included (§1.3).
MAX_MESSAGES_PER_SECOND = 5
CONNECTION_LIFETIME = 24 * 3600.0


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
        reactor: Clock,
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
