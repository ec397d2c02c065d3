"""One websocket connection of a feed: reconnects, outbound pacing, liveness.

A Connection knows nothing about symbols or venues: it reports what happens
to its `ConnectionEvents` (the connection pool) and sends what it is given,
paced. Its transport comes from an injected connector, so tests drive it
without sockets.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aggregator.exchanges.venue import VenueSettings
from aggregator.exchanges.websocket import ConnectionHandler, FeedProtocol, websocket_client_service


class ConnectionEvents(Protocol):
    """What a Connection reports, and the one thing it asks: what to send next."""

    def connection_opened(self, connection: Connection) -> None: ...

    def frame_received(self, connection: Connection, payload: bytes, arrival: float) -> None: ...

    def connection_lost(self, connection: Connection, reason: str) -> None: ...

    def connection_aged(self, connection: Connection) -> None:
        """The connection reached the venue's maximum age: replace it."""

    def connection_idle(self, connection: Connection) -> None:
        """Half the inactivity timeout passed in silence: probe if possible."""

    def next_frame(self, connection: Connection) -> Any:
        """A frame to send now that a send slot is free, or None."""

    def all_sent(self, connection: Connection) -> None:
        """Nothing is left to send on the connection."""


class Startable(Protocol):
    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None]: ...


class ConnectionObserver(Protocol):
    """Sees a connection's traffic (--record, aggregator/recording.py)."""

    def opened(self, label: str, url: str) -> None: ...

    def received(self, label: str, payload: bytes, arrival: float) -> None: ...

    def sent(self, label: str, payload: bytes) -> None: ...

    def closed(self, label: str, reason: str) -> None: ...


Connector = Callable[["Connection"], Startable]
"""Makes the service that connects (and reconnects) `connection` to its URL;
the service reports to the connection as its ConnectionHandler."""


class Connection(ConnectionHandler):
    log = Logger()

    def __init__(
        self,
        label: str,
        url: str,
        settings: VenueSettings,
        events: ConnectionEvents,
        reactor: IReactorTime,
        retry_policy: Callable[[int], float],
        connector: Connector,
    ) -> None:
        self.label = label
        self.url = url
        self.settings = settings
        self._events = events
        self._reactor = reactor
        self._retry_policy = retry_policy
        self._connector = connector
        self.protocol: FeedProtocol | None = None
        self.opened_at: float | None = None
        self.opens = 0
        self.last_activity = 0.0
        self.flaps = 0  # short-lived connections in a row: they keep the backoff up
        self._service: Startable | None = None
        self._outbox: deque[bytes] = deque()
        self._send_timer: IDelayedCall | None = None
        self._draining = False  # inside _drain: a send() made meanwhile is picked up by it
        self._next_send_at = 0.0
        self._liveness: LoopingCall | None = None
        self._rotation: IDelayedCall | None = None
        self.observer: ConnectionObserver | None = None  # set by the feed when recording

    def __repr__(self) -> str:
        return f"<{self.label}>"

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        self._service = self._connector(self)
        self._service.startService()

    def stop(self) -> Deferred[None]:
        self._cancel_timers()
        self._outbox.clear()
        service, self._service = self._service, None
        return service.stopService() if service is not None else succeed(None)

    def retry_delay(self, attempt: int) -> float:
        """Backoff before reconnect attempt `attempt`; flaps keep it growing.
        Rounded: it is logged, and nobody needs its 16th decimal."""
        return round(self._retry_policy(attempt + self.flaps), 2)

    # -- events from FeedProtocol (ConnectionHandler) ------------------------------

    def connection_opened(self, protocol: FeedProtocol) -> None:
        reactor = self._reactor
        self.protocol = protocol
        self.opens += 1
        self.opened_at = self.last_activity = reactor.seconds()
        self._next_send_at = 0.0
        timeout = self.settings.inactivity_timeout
        self._liveness = LoopingCall(self._check_liveness)
        self._liveness.clock = reactor
        self._liveness.start(timeout / 4, now=False)
        if self.settings.max_connection_age is not None:
            self._rotation = reactor.callLater(
                self.settings.max_connection_age, self._events.connection_aged, self
            )
        if self.observer is not None:
            self.observer.opened(self.label, self.url)
        self._events.connection_opened(self)

    def message_received(self, payload: bytes) -> None:
        self.last_activity = arrival = self._reactor.seconds()
        if self.observer is not None:
            self.observer.received(self.label, payload, arrival)
        self._events.frame_received(self, payload, arrival)

    def activity(self) -> None:
        """A ping or pong: the connection is alive even if the market is quiet."""
        self.last_activity = self._reactor.seconds()

    def connection_closed(self, protocol: FeedProtocol, reason: str) -> None:
        if protocol is not self.protocol:
            return
        opened_at = self.opened_at if self.opened_at is not None else 0.0
        lived = self._reactor.seconds() - opened_at
        self.flaps = self.flaps + 1 if lived < self.settings.healthy_period else 0
        self.protocol = None
        if self.observer is not None:
            self.observer.closed(self.label, reason)
        self._cancel_timers()
        self._outbox.clear()
        self._events.connection_lost(self, reason)

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
        idle = self._reactor.seconds() - self.last_activity
        timeout = self.settings.inactivity_timeout
        if idle > timeout:
            self.log.warn(
                "{connection}: nothing received for {idle:.0f}s; reconnecting",
                connection=self.label, idle=idle,
            )
            self.drop()
        elif idle > timeout / 2:
            self._events.connection_idle(self)

    def drop(self) -> None:
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)

    # -- sending, paced -----------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue a JSON frame; frames leave at most settings.frames_per_second."""
        if self.protocol is None:
            return
        self._outbox.append(orjson.dumps(message))
        self.wake()

    def wake(self) -> None:
        """Something may be waiting to be sent: send it when a slot is free,
        at the earliest at the end of this reactor turn, so that the demand
        changes of one turn (a client asking for many symbols, a burst of
        disconnects) leave as few frames as possible."""
        if self._send_timer is None and not self._draining and self.protocol is not None:
            self._send_timer = self._reactor.callLater(0, self._drain)

    @property
    def sending(self) -> bool:
        return bool(self._outbox) or self._send_timer is not None

    def _drain(self) -> None:
        self._send_timer = None
        self._draining = True
        try:
            self._send_paced()
        finally:
            self._draining = False

    def _send_paced(self) -> None:
        reactor = self._reactor
        interval = 1.0 / self.settings.frames_per_second
        while self.protocol is not None:
            now = reactor.seconds()
            if now < self._next_send_at:
                self._send_timer = reactor.callLater(self._next_send_at - now, self._drain)
                return
            if self._outbox:
                frame = self._outbox.popleft()
            else:
                # Demand frames are built only now, when they can leave: a
                # change that an opposite one cancels before then never does.
                message = self._events.next_frame(self)
                if message is None:
                    self._events.all_sent(self)
                    return
                frame = orjson.dumps(message)
            if self.observer is not None:
                self.observer.sent(self.label, frame)
            self.protocol.sendMessage(frame, isBinary=False)
            self._next_send_at = max(now, self._next_send_at) + interval


def websocket_connector(reactor: Any) -> Connector:
    """The production connector: Autobahn under a ClientService (reconnects)."""

    def connect(connection: Connection) -> Startable:
        settings = connection.settings
        return websocket_client_service(
            reactor,
            connection.url,
            connection,
            connection.retry_delay,
            settings.auto_ping_interval,
            settings.auto_ping_timeout,
            name=connection.label,
        )

    return connect
