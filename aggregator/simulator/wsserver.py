"""What the Binance and Bitstamp websocket servers share: connection tracking, the stall and
close faults, client→server frame counting, and batched frame writes.

A stalled connection goes silent without closing, the way a hung server or a black-holed
route looks from the client: nothing is written (no data, no pings, no replies, no close
frames), nothing is read (the transport's reading is paused, so the client's pings, heartbeats
and requests wait in the socket buffers), and the server's own keepalive timers are suspended.
Data produced for it meanwhile is lost. When the stall ends, reading resumes, the backlog of
client frames is processed and answered, and data flows again (on Binance the first frame
then shows a U gap). Only connections open when the stall starts are stalled: a client that
gives up on a silent connection and opens a new one is served.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Callable, Iterable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .clock import Clock
from .connections import ConnectionSet
from .faults import REASON_PONG_TIMEOUT, Violation, valid_close_code

# Frames a stalled connection's client may have queued are read in a burst when the stall
# ends; that burst is not the client's doing, so it is not counted for this long.
UNSTALL_GRACE = 1.0
# Opcodes that count as client messages: text, binary, ping, pong (not continuation frames of
# a fragmented message, nor the close frame).
COUNTED_OPCODES = (1, 2, 9, 10)


def ws_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server→client text frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class SimServerProtocol(WebSocketServerProtocol):
    """Base of the simulator's websocket server protocols."""

    # Autobahn uses self.log (a txaio logger) internally: ours gets another name.
    _log = Logger()
    factory: "SimServerFactory"
    # A TCP transport (TCP_NODELAY, pause/resume, writeSequence); twisted types it as the
    # optional ITransport.
    transport: Any
    # Set by autobahn from the factory's protocol options.
    autoPingInterval: float
    autoPingTimeout: float

    def connectionMade(self) -> None:
        self.stalled = False
        self._grace_until = 0.0
        self._recent: deque[float] = deque()  # arrival times of the last counted client frames
        self.frames_received = 0
        self._lifetime_call: Any = None
        super().connectionMade()
        # Small frames must not wait for delayed ACKs (DESIGN: TCP_NODELAY on the data path).
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.factory.connections.add(self, self.transport)
        lifetime = self.factory.connection_lifetime
        if lifetime is not None:
            self._lifetime_call = self.factory.reactor.callLater(lifetime, self._lifetime_over)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if self._lifetime_call is not None and self._lifetime_call.active():
                self._lifetime_call.cancel()
            self._lifetime_call = None
            self.release()
            self.factory.connections.discard(self)

    def release(self) -> None:
        """Drop this connection's subscriptions (subclasses)."""

    # ------------------------------------------------------------ writing

    @property
    def writable(self) -> bool:
        return self.state == self.STATE_OPEN and not self.stalled

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Every frame autobahn writes (data, ping, pong, close) passes here: a stall eats them.
        if self.stalled:
            return
        super().sendData(data, sync, chopsize)

    def sendPreparedMessage(self, preparedMsg: Any) -> None:
        # Hubs broadcast to every subscriber; once a close handshake has begun, data frames
        # would be a protocol error, so they are skipped here.
        if self.writable:
            super().sendPreparedMessage(preparedMsg)

    def write_frames(self, frames: list[bytes]) -> None:
        """Write ready-made frames (see `ws_frame`) in one go: the hubs' batched path."""
        if self.writable:
            self.transport.writeSequence(frames)

    def reply(self, payload: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload, isBinary=False)

    # ------------------------------------------------------------ faults

    def stall(self) -> bool:
        """Go silent (see the module docstring). False if not open or already stalled."""
        if self.state != self.STATE_OPEN or self.stalled:
            return False
        self.stalled = True
        self.transport.pauseProducing()
        # The keepalive pauses with the rest: no ping goes out, so no pong timeout either.
        for name in ("autoPingPendingCall", "autoPingTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)
        self.autoPingPending = None
        return True

    def unstall(self) -> bool:
        if not self.stalled:
            return False
        self.stalled = False
        self._grace_until = self.factory.reactor.seconds() + UNSTALL_GRACE
        if self.state != self.STATE_CLOSED:
            self.transport.resumeProducing()
        if self.state == self.STATE_OPEN and self.autoPingInterval:
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval, self._sendAutoPing
            )
        return True

    def close_with(self, code: int, reason: str) -> bool:
        """Start a closing handshake with this code and reason; False if not open. Any code a
        server may send (autobahn's sendClose only allows 1000 and 3000-4999)."""
        if not valid_close_code(code):
            raise ValueError(f"invalid close code {code}")
        if self.state != self.STATE_OPEN:
            return False
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)
        return True

    def _lifetime_over(self) -> None:
        self._lifetime_call = None
        code, reason = self.factory.lifetime_close
        self.close_with(code, reason)

    def onAutoPingTimeout(self) -> None:
        # The client did not answer a ping in time: close with 1008 "Pong timeout" (Binance,
        # PROTOCOLS §1.4) instead of autobahn's silent drop.
        self.autoPingTimeoutCall = None
        self.factory.violation("pong_timeout", f"{self.peer}: no pong within {self.autoPingTimeout} s")
        self.close_with(1008, REASON_PONG_TIMEOUT)

    # ------------------------------------------------------------ reading

    def onFrameBegin(self) -> None:
        limit = self.factory.max_messages_per_second
        opcode = self.current_frame.opcode
        if opcode in COUNTED_OPCODES:
            self.frames_received += 1
            if limit is not None and self.state == self.STATE_OPEN:
                now = self.factory.reactor.seconds()
                if now >= self._grace_until:
                    recent = self._recent
                    recent.append(now)
                    while recent and recent[0] <= now - 1.0:
                        recent.popleft()
                    if len(recent) > limit:
                        self.factory.violation(
                            "too_many_messages", f"{self.peer}: {len(recent)} client frames within 1 s"
                        )
                        self.close_with(*self.factory.too_many_messages_close)
        super().onFrameBegin()


class SimServerFactory(WebSocketServerFactory):
    """Base of the simulator's websocket factories: open connections and the faults on them.

    `max_messages_per_second`: client frames (data, ping and pong) allowed per connection within
    any 1 s window; one more closes the connection (None: unlimited).
    `connection_lifetime`: seconds after which the server closes a connection (None: never).
    """

    noisy = False
    _logger = Logger()
    # A SimServerProtocol subclass (mypy does not see autobahn's protocols as twisted ones).
    protocol: Any
    exchange = ""
    lifetime_close = (1001, "connection lifetime over")
    too_many_messages_close = (1008, "Too many messages")

    def __init__(
        self,
        reactor: Clock,
        on_violation: Callable[[Violation], None] | None = None,
        max_messages_per_second: int | None = None,
        connection_lifetime: float | None = None,
    ):
        super().__init__(reactor=reactor)
        self.connections = ConnectionSet()
        self.max_messages_per_second = max_messages_per_second
        self.connection_lifetime = connection_lifetime
        self._on_violation = on_violation
        self._unstall_calls: list[Any] = []

    def violation(self, kind: str, detail: str) -> None:
        """A client broke a rule: log it and tell the service (sim.violations)."""
        self._logger.info("{exchange} client violation {kind}: {detail}", exchange=self.exchange, kind=kind, detail=detail)
        if self._on_violation is not None:
            self._on_violation(Violation(self.reactor.seconds(), self.exchange, kind, detail))

    def open_protocols(self) -> Iterable[SimServerProtocol]:
        return list(self.connections)

    def drop_clients(self) -> Deferred[None]:
        return self.connections.drop_all()

    def stall(self, duration: float | None = None) -> int:
        """Stall every open connection; with `duration`, unstall them after that many seconds.
        Returns how many connections were stalled."""
        stalled = [p for p in self.open_protocols() if p.stall()]
        if duration is not None and stalled:
            call = self.reactor.callLater(duration, self._unstall, stalled)
            self._unstall_calls.append(call)
        return len(stalled)

    def _unstall(self, protocols: list[SimServerProtocol]) -> None:
        self._unstall_calls = [c for c in self._unstall_calls if c.active()]
        for p in protocols:
            p.unstall()

    def unstall(self) -> int:
        """End every stall now; returns how many connections were stalled."""
        for call in self._unstall_calls:
            if call.active():
                call.cancel()
        self._unstall_calls = []
        return sum(1 for p in self.open_protocols() if p.unstall())

    @property
    def stalled(self) -> int:
        return sum(1 for p in self.open_protocols() if p.stalled)

    def close_clients(self, code: int, reason: str) -> int:
        """Close every open connection with this close code and reason; returns how many."""
        if not valid_close_code(code):
            raise ValueError(f"invalid close code {code}")
        return sum(1 for p in self.open_protocols() if p.close_with(code, reason))

    def stop(self) -> None:
        for call in self._unstall_calls:
            if call.active():
                call.cancel()
        self._unstall_calls = []
