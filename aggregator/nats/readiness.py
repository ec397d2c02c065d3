"""gRPC health of an ingest daemon, which serves no BookSummary streams.

Its `--listen` port answers grpc.health.v1 (and reflection) only: the server
("") is SERVING while it runs; INGEST_SERVICE is SERVING while the daemon is
connected to NATS with its stream and buckets ready *and* at least one
exchange is connected with its symbol list loaded — i.e. it can take leases
and publish books — and NOT_SERVING otherwise (e.g. NATS unreachable).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable

import grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from aggregator.address import CannotListen
from aggregator.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from aggregator.health import Health, HealthFeed
from aggregator.nats.bus import Bus
from aggregator.tls import KeyPair

INGEST_SERVICE = "aggregator.nats.Ingest"


class IngestReadiness:
    """One HealthFeed standing for NATS and the exchange feeds together."""

    name = "ingest"

    def __init__(self, bus: Bus, feeds: Iterable[HealthFeed]) -> None:
        self.bus = bus
        self.feeds = list(feeds)
        self._listeners: list[Callable[[str, bool], None]] = []
        bus.add_listener(self)
        for feed in self.feeds:
            feed.add_connection_listener(lambda _name, _up: self._changed())

    @property
    def connected(self) -> bool:
        return self.bus.connected and any(
            feed.connected and feed.listed_symbols() is not None for feed in self.feeds
        )

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        self._listeners.append(listener)

    def listed_symbols(self) -> frozenset[str] | None:
        listed = [feed.listed_symbols() for feed in self.feeds]
        known = [symbols for symbols in listed if symbols is not None]
        return frozenset().union(*known) if known else None

    def when_symbols_loaded(self) -> Deferred[Any]:
        return gatherResults([feed.when_symbols_loaded() for feed in self.feeds], consumeErrors=True)

    async def bus_up(self, first: bool) -> None:
        self._changed()

    def bus_down(self) -> None:
        self._changed()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self.name, self.connected)


class HealthServer(Service):
    """grpc.aio server with health and reflection only (created in startService:
    twistd forks after makeService)."""

    log = Logger()

    def __init__(self, listen: str, health: Health, tls: KeyPair | None = None) -> None:
        self.listen = listen
        self.health = health
        self.tls = tls
        self.port: int | None = None
        self._server: Any = None
        self._started: Deferred[Any] = succeed(None)

    def startService(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health.add_to(server)
        reflection.enable_server_reflection([HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            if self.tls is None:
                port = server.add_insecure_port(self.listen)
            else:
                port = server.add_secure_port(self.listen, self.tls.server_credentials())
        except RuntimeError as error:
            raise CannotListen(f"cannot listen for gRPC on {self.listen}: {error}") from None
        if port == 0:
            raise CannotListen(
                f"cannot listen for gRPC on {self.listen}: address in use or unavailable"
            )
        super().startService()
        self._server, self.port = server, port
        self._started = Deferred.fromFuture(asyncio.ensure_future(server.start()))
        self.log.info(
            "gRPC health of the ingest daemon on {listen} (port {port})",
            listen=self.listen,
            port=port,
        )

    def whenStarted(self) -> Deferred[Any]:
        return self._started

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return succeed(None)
        return self.health.shut_down().addCallback(
            lambda _: Deferred.fromFuture(asyncio.ensure_future(server.stop(0.5)))
        )
