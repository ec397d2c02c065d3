"""Keeping track of accepted connections, so that stopping a server really drops its clients.

`stopListening` only closes the listening socket; websocket clients and keep-alive HTTP
clients (treq pools connections) would stay connected to a stopped simulator. Tests and the
daemon's reconnect logic need a stop to look like the exchange going away.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure


class ConnectionSet:
    """The live connections of one server; `drop_all` aborts them and waits until they are gone."""

    def __init__(self) -> None:
        self._transports: dict[Any, ITransport] = {}  # key (a protocol) -> its transport
        self._waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._transports)

    def __iter__(self):  # the keys (protocols)
        return iter(list(self._transports))

    def add(self, key: Any, transport: ITransport) -> None:
        self._transports[key] = transport

    def discard(self, key: Any) -> None:
        self._transports.pop(key, None)
        if not self._transports:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def drop_all(self) -> Deferred[None]:
        """Abort every connection; fires once each has seen connectionLost."""
        if not self._transports:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        for transport in list(self._transports.values()):
            transport.abortConnection()  # type: ignore[attr-defined]
        return d


class _TrackedProtocol(ProtocolWrapper):
    def makeConnection(self, transport: ITransport) -> None:
        # Small responses should not wait for a delayed ACK (Nagle) either.
        try:
            transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass
        self.factory.connections.add(self, transport)  # type: ignore[attr-defined]
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.connections.discard(self)  # type: ignore[attr-defined]


class TrackingFactory(WrappingFactory):
    """Wraps a server factory (a twisted.web Site) so that its connections can be dropped."""

    protocol = _TrackedProtocol
    noisy = False

    def __init__(self, wrappedFactory: Any):
        super().__init__(wrappedFactory)
        self.connections = ConnectionSet()
