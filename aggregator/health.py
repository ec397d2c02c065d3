"""grpc.health.v1 for the daemon: what load balancers, probes and
`grpc_health_probe` ask.

The overall status ("") is SERVING while the gRPC server runs. Each API
service (orderbook.Aggregator, orderbook.OrderbookAggregator) is SERVING while
at least one exchange is up — connected, its symbol list loaded — and
NOT_SERVING while none is: a stream opened then would show no levels at all.
Everything turns NOT_SERVING when the server starts shutting down.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, Iterable, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthFeed(Protocol):
    """What health reporting needs from an exchange feed."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None: ...

    def listed_symbols(self) -> frozenset[str] | None: ...

    def when_symbols_loaded(self) -> Deferred[None]: ...


class Health:
    """Keeps the per-service statuses of a HealthServicer in step with the feeds."""

    log = Logger()

    def __init__(self, feeds: Iterable[HealthFeed], services: Sequence[str]) -> None:
        self._feeds = list(feeds)
        self._services = tuple(services)
        self._servicer: health_aio.HealthServicer | None = None
        self._serving: bool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for feed in self._feeds:
            feed.add_connection_listener(self._feed_changed)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve grpc.health.v1.Health on a grpc.aio server about to start."""
        # A new servicer per start: its graceful shutdown is permanent.
        self._servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self._serving = None
        for feed in self._feeds:
            feed.when_symbols_loaded().addCallback(lambda _: self._update())
        self._update()

    def shut_down(self) -> Deferred[None]:
        """Every status NOT_SERVING, for good: the server is stopping."""
        servicer, self._servicer = self._servicer, None
        if servicer is None:
            return succeed(None)
        self.log.info("health: NOT_SERVING (shutting down)")
        return Deferred.fromFuture(asyncio.ensure_future(servicer.enter_graceful_shutdown()))

    def _feed_changed(self, exchange: str, connected: bool) -> None:
        self._update()

    def _update(self) -> None:
        if self._servicer is None:
            return
        up = [f.name for f in self._feeds if f.connected and f.listed_symbols() is not None]
        serving = bool(up)
        if serving == self._serving:
            return
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        self.log.info(
            "health: {services} {status} ({why})",
            services=", ".join(self._services),
            status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
            why=f"up: {', '.join(up)}" if up else "no exchange connected with its symbols listed",
        )
        for service in self._services:
            self._run(self._servicer.set(service, status))

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        # set() is a coroutine (it wakes Watch streams); tasks run in the
        # order created, so the last status set is the one that stays.
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
