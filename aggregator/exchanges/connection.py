"""One websocket connection of a feed: reconnects, outbound pacing, liveness.

A feed holds one or more Connections (an exchange caps streams per
connection), each carrying a set of symbols. A Connection can be replaced
make-before-break: a successor opens and subscribes while the old one keeps
serving, then the feed hands over and closes the old one.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator.exchanges.websocket import FeedProtocol, websocket_client_service

if TYPE_CHECKING:
    from aggregator.exchanges.feed import ExchangeFeed


class Connection:
    log = Logger()

    def __init__(self, feed: ExchangeFeed, number: int, replaces: Connection | None = None) -> None:
        self.feed = feed
        self.number = number
        self.symbols: set[str] = set(replaces.symbols) if replaces else set()
        # While not None, this connection is a successor being brought up.
        self.replaces = replaces
        self.successor: Connection | None = None
        self.protocol: FeedProtocol | None = None
        self.opened_at: float | None = None
        self.opens = 0
        self.last_activity = 0.0
        self.flaps = 0  # short-lived connections in a row: they keep the backoff up
        # JSON-RPC style requests awaiting a reply on this connection: id → anything.
        self.requests: dict[int, Any] = {}
        self._next_request_id = 1
        self._service: ClientService | None = None
        self._outbox: deque[bytes] = deque()
        self._send_timer: Any = None
        self._next_send_at = 0.0
        self._liveness: LoopingCall | None = None
        self._rotation: Any = None

    def __repr__(self) -> str:
        return f"<{self.feed.name} connection #{self.number}>"

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        feed = self.feed
        self._service = websocket_client_service(
            feed.reactor,
            feed.connection_url(),
            self,
            self._retry_delay,
            feed.auto_ping_interval,
            feed.auto_ping_timeout,
        )
        self._service.startService()

    def stop(self) -> Deferred:
        self._cancel_timers()
        self._outbox.clear()
        service, self._service = self._service, None
        return service.stopService() if service is not None else succeed(None)

    def _retry_delay(self, attempt: int) -> float:
        return self.feed.retry_policy(attempt + self.flaps)

    def next_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    # -- events from FeedProtocol ------------------------------------------------

    def connection_opened(self, protocol: FeedProtocol) -> None:
        reactor = self.feed.reactor
        self.protocol = protocol
        self.opens += 1
        self.opened_at = self.last_activity = reactor.seconds()
        self._next_send_at = 0.0
        self.requests.clear()
        timeout = self.feed.inactivity_timeout
        self._liveness = LoopingCall(self._check_liveness)
        self._liveness.clock = reactor
        self._liveness.start(timeout / 4, now=False)
        if self.feed.max_connection_age is not None:
            self._rotation = reactor.callLater(
                self.feed.max_connection_age, self.feed.rotate, self, "connection age limit"
            )
        self.feed.connection_opened(self)

    def message_received(self, payload: bytes) -> None:
        self.last_activity = self.feed.reactor.seconds()
        self.feed.frame_received(self, payload)

    def activity(self) -> None:
        """A ping or pong: the connection is alive even if the market is quiet."""
        self.last_activity = self.feed.reactor.seconds()

    def connection_closed(self, protocol: FeedProtocol, reason: str) -> None:
        if protocol is not self.protocol:
            return
        lived = self.feed.reactor.seconds() - (self.opened_at if self.opened_at is not None else 0.0)
        self.flaps = self.flaps + 1 if lived < self.feed.healthy_period else 0
        self.protocol = None
        self._cancel_timers()
        self._outbox.clear()
        self.requests.clear()
        self.feed.connection_lost(self, reason)

    def _cancel_timers(self) -> None:
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        self._liveness = None
        for timer in (self._send_timer, self._rotation):
            if timer is not None and timer.active():
                timer.cancel()
        self._send_timer = self._rotation = None

    # -- liveness -----------------------------------------------------------------

    def _check_liveness(self) -> None:
        idle = self.feed.reactor.seconds() - self.last_activity
        if idle > self.feed.inactivity_timeout:
            self.log.warn(
                "{connection}: nothing received for {idle:.0f}s; reconnecting",
                connection=self, idle=idle,
            )
            self.drop()
        elif idle > self.feed.inactivity_timeout / 2:
            self.feed.idle_probe(self)

    def drop(self) -> None:
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)

    # -- sending, paced -----------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue a JSON frame; frames leave at most feed.frames_per_second."""
        if self.protocol is None:
            return
        self._outbox.append(orjson.dumps(message))
        if self._send_timer is None:
            self._drain()

    @property
    def sending(self) -> bool:
        return bool(self._outbox)

    def _drain(self) -> None:
        self._send_timer = None
        reactor = self.feed.reactor
        interval = 1.0 / self.feed.frames_per_second
        while self._outbox and self.protocol is not None:
            now = reactor.seconds()
            if now < self._next_send_at:
                self._send_timer = reactor.callLater(self._next_send_at - now, self._drain)
                return
            self.protocol.sendMessage(self._outbox.popleft(), isBinary=False)
            self._next_send_at = max(now, self._next_send_at) + interval
