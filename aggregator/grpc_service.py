"""gRPC front: requests → demand and subscribers, errors → status codes.

No book logic here. Summaries arrive already serialized (once per change, for
every client), so the handler is registered with an identity serializer.

Two APIs share the one handler: orderbook.Aggregator/BookSummary(Request) for
any symbol, and the widely used challenge API
orderbook.OrderbookAggregator/BookSummary(Empty) for the default symbol. Their
request deserializers turn either request into the symbol asked for.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, NamedTuple, NoReturn, Protocol, cast

import grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aggregator import __version__, metrics
from aggregator._proto import orderbook_pb2
from aggregator.address import CannotListen, is_loopback, split_host_port
from aggregator.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from aggregator.health import Health
from aggregator.merger import (
    AmbiguousSymbol,
    InvalidView,
    Subscription,
    SymbolListsUnavailable,
    TooManySymbols,
    UnknownSymbol,
)
from aggregator.symbols import InvalidSymbol, normalize
from aggregator.throttled_log import ThrottledLog
from aggregator.tls import KeyPair, RefusedHandshakes

_SERVICES = orderbook_pb2.DESCRIPTOR.services_by_name
SERVICE_NAME = _SERVICES["Aggregator"].full_name
COMPAT_SERVICE_NAME = _SERVICES["OrderbookAggregator"].full_name
API_SERVICES = (SERVICE_NAME, COMPAT_SERVICE_NAME)

class StreamRequest(NamedTuple):
    """What a BookSummary stream asks for (orderbook.Request; the compatibility
    API's Empty asks for --default-symbol)."""

    symbol: str
    exchanges: tuple[str, ...]
    depth: int

    @classmethod
    def decode(cls, data: bytes) -> StreamRequest:
        request = orderbook_pb2.Request.FromString(data)
        return cls(request.symbol, tuple(request.exchanges), request.depth)


_REFUSALS = {
    InvalidView: grpc.StatusCode.INVALID_ARGUMENT,
    AmbiguousSymbol: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownSymbol: grpc.StatusCode.NOT_FOUND,
    TooManySymbols: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SymbolListsUnavailable: grpc.StatusCode.UNAVAILABLE,
}

# Requests are a symbol, a health check or a reflection query: a few hundred
# bytes. gRPC's default (4 MiB) would let every client make us buffer more.
_MAX_REQUEST_BYTES = 64 * 1024
# Room for RPCs other than BookSummary, so that health checks and reflection
# still answer while the streams are at their limit.
_OTHER_RPCS = 64


@dataclass(frozen=True)
class Limits:
    """What clients can make the daemon hold, whatever they send."""

    max_streams: int = 1000  # concurrent BookSummary streams, both APIs together
    max_symbols: int = 100  # distinct symbols with demand (clients and --symbols)


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 pings that notice dead clients (host gone, network cut) and free
    their streams and demand; without them a silent peer holds its stream until
    TCP gives up, which takes many minutes.
    """

    interval: float = 20.0  # seconds between pings
    timeout: float = 10.0  # seconds to wait for the ack before closing

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", round(self.interval * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.timeout * 1000)),
            # gRPC 1.85 gives up on an unanswered ping after this one (default
            # one minute), whatever keepalive_timeout says: set both.
            ("grpc.http2.ping_timeout_ms", round(self.timeout * 1000)),
            # Idle connections too; and keep pinging a stream whose symbol is
            # quiet (by default pings stop after two without data).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may keep their side alive too (aggregator-client pings
            # every 20 s); the default would answer pings more often than every
            # 5 minutes with GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]


def format_peer(peer: str) -> str:
    """gRPC's "ipv6:%5B::1%5D:40272" → "[::1]:40272", "ipv4:127.0.0.1:5000" →
    "127.0.0.1:5000": the address as a user would type it."""
    scheme, _, address = urllib.parse.unquote(peer).partition(":")
    return address if scheme in ("ipv4", "ipv6") else urllib.parse.unquote(peer)


class SummarySource(Protocol):
    """Where the servicer gets Summaries: the Merger, or an edge's NATS source
    (aggregator/nats/edge.py). subscribe() raises UnknownSymbol,
    TooManySymbols, SymbolListsUnavailable or InvalidView."""

    def subscribe(
        self,
        symbol: str,
        max_symbols: int | None = None,
        exchanges: Iterable[str] = (),
        depth: int = 0,
    ) -> Subscription: ...

    def when_symbol_lists_loaded(self) -> Deferred[Any]: ...


class AggregatorServicer:
    log = Logger()

    def __init__(
        self,
        merger: SummarySource,
        symbol_list_wait: float = 5.0,
        default_symbol: str = "ethbtc",
        limits: Limits = Limits(),
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.merger = merger
        # Streams asked for while the daemon starts wait up to symbol_list_wait
        # for the exchanges' symbol lists; later ones are answered at once: a
        # list still missing then is an exchange down, which waiting won't fix.
        self.symbol_lists_wait_until = clock.seconds() + symbol_list_wait
        self.default_symbol = default_symbol
        self.limits = limits
        self.clock = clock  # the clock frame arrivals are marked with
        self.streams = 0  # admitted, including those still waiting for a subscription
        self.subscriptions: set[Subscription] = set()
        # A client retrying in a loop must not flood the log.
        self._refusals = ThrottledLog(self.log, clock)

    async def BookSummary(
        self, request: StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        # Read now: context.peer() on a finished call crashes the process (grpcio 1.85).
        peer = format_peer(context.peer())
        # Before anything else, so no request beyond the limit costs anything.
        if self.streams >= self.limits.max_streams:
            await self._refuse(
                context,
                peer,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many streams: the daemon serves at most {self.limits.max_streams} at once",
            )
        self.streams += 1
        metrics.ACTIVE_STREAMS.inc()
        subscription = None
        try:
            try:
                symbol = normalize(request.symbol)
            except InvalidSymbol as error:
                await self._refuse(context, peer, grpc.StatusCode.INVALID_ARGUMENT, str(error))
            subscription = await self._subscribe(symbol, request, context, peer)
            self.subscriptions.add(subscription)
            self.log.info("stream opened: {symbol} for {peer}", symbol=symbol, peer=peer)
            loop = asyncio.get_running_loop()
            while True:
                # A busy stream usually has its next Summary waiting: take it
                # without awaiting.
                summary = subscription.take()
                if summary is None:
                    summary = await subscription.wait(loop)
                    if summary is None:
                        return
                self._count_sent(subscription.arrival)
                yield summary
        finally:
            self.streams -= 1
            metrics.ACTIVE_STREAMS.dec()
            if subscription is not None:
                self.subscriptions.discard(subscription)
                subscription.close()
                self.log.info(
                    "stream closed: {symbol} for {peer}", symbol=subscription.symbol, peer=peer
                )

    def _count_sent(self, arrival: float | None) -> None:
        metrics.SUMMARIES_SENT.inc()
        if arrival is not None:
            # Clamped: the reactor's clock is the wall clock, which may step back.
            metrics.UPDATE_LATENCY.observe(max(0.0, self.clock.seconds() - arrival))

    async def _subscribe(
        self, symbol: str, request: StreamRequest, context: grpc.aio.ServicerContext, peer: str
    ) -> Subscription:
        try:
            return self.merger.subscribe(
                symbol, self.limits.max_symbols, request.exchanges, request.depth
            )
        except SymbolListsUnavailable as error:
            wait = self.symbol_lists_wait_until - self.clock.seconds()
            if wait <= 0:
                await self._refuse(context, peer, grpc.StatusCode.UNAVAILABLE, str(error))
        except (UnknownSymbol, TooManySymbols, InvalidView) as error:
            await self._refuse(context, peer, _REFUSALS[type(error)], str(error))
        # Just started: wait a little for the exchanges' symbol lists.
        loaded = self.merger.when_symbol_lists_loaded()
        loaded.addErrback(lambda failure: failure.trap(CancelledError))  # our timeout
        try:
            await asyncio.wait_for(loaded.asFuture(asyncio.get_running_loop()), wait)
        except asyncio.TimeoutError:
            pass
        try:
            return self.merger.subscribe(
                symbol, self.limits.max_symbols, request.exchanges, request.depth
            )
        except (UnknownSymbol, TooManySymbols, SymbolListsUnavailable, InvalidView) as error:
            await self._refuse(context, peer, _REFUSALS[type(error)], str(error))

    async def _refuse(
        self, context: grpc.aio.ServicerContext, peer: str, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        metrics.STREAMS_REFUSED.labels(code.name.lower()).inc()
        self._refusals.warn(
            code, "stream refused for {peer}: {code} {reason}", peer=peer, code=code.name,
            reason=message,
        )
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def _default_request(self, request: bytes) -> StreamRequest:
        orderbook_pb2.Empty.FromString(request)  # still a malformed request if not an Empty
        return StreamRequest(self.default_symbol, (), 0)

    def end_streams(self) -> None:
        for subscription in list(self.subscriptions):
            subscription.end()

    def generic_handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        def book_summary(
            request_deserializer: Callable[[bytes], StreamRequest]
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                self.BookSummary,
                request_deserializer=request_deserializer,
                response_serializer=None,  # already bytes
            )

        return (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {"BookSummary": book_summary(StreamRequest.decode)},
            ),
            grpc.method_handlers_generic_handler(
                COMPAT_SERVICE_NAME, {"BookSummary": book_summary(self._default_request)}
            ),
        )


class GrpcServer(Service):
    """grpc.aio server, created in startService: twistd forks between
    makeService and startService, and gRPC must not be set up before a fork.

    Serves the two APIs, the health service (if given) and server reflection,
    so generic tools (grpcurl, evans, Postman) work without the .proto.
    """

    log = Logger()

    def __init__(
        self,
        listen: str,
        servicer: AggregatorServicer,
        grace: float = 0.5,
        *,
        health: Health | None = None,
        tls: KeyPair | None = None,
        keepalive: Keepalive = Keepalive(),
    ) -> None:
        self.listen = listen
        self.servicer = servicer
        self.grace = grace
        self.health = health
        self.tls = tls
        self.keepalive = keepalive
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._started: Deferred[None] = succeed(None)
        self._refused_handshakes = None if tls is None else RefusedHandshakes(servicer.clock)

    def startService(self) -> None:
        server = grpc.aio.server(
            options=[
                # Two daemons must not silently share a port (SO_REUSEPORT is on by default).
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
                *self.keepalive.server_options(),
            ],
            maximum_concurrent_rpcs=self.servicer.limits.max_streams + _OTHER_RPCS,
        )
        server.add_generic_rpc_handlers(self.servicer.generic_handlers())
        services = [*API_SERVICES, reflection.SERVICE_NAME]
        if self.health is not None:
            self.health.add_to(server)
            services.append(HEALTH_SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        port = self._bind(server)
        if self._refused_handshakes is not None:
            self._refused_handshakes.start(asyncio.get_event_loop())
        super().startService()
        self._server = server
        self.port = port
        self._started = Deferred.fromFuture(asyncio.ensure_future(server.start()))
        self.log.info(
            "gRPC listening on {listen} (port {port}, {security}); aggregator {version}",
            listen=self.listen,
            port=port,
            security=self._security(),
            version=__version__,
        )
        self.warn_if_exposed()

    def warn_if_exposed(self) -> None:
        if self.tls is None and not is_loopback(split_host_port(self.listen)[0]):
            self.log.warn(
                "gRPC on {listen} is reachable beyond this machine in plaintext: anyone who "
                "can reach it may connect and read it; add --tls-cert/--tls-key "
                "(and --tls-client-ca to choose who may connect)",
                listen=self.listen,
            )

    def _security(self) -> str:
        if self.tls is None:
            return "plaintext"
        return "TLS" if self.tls.client_ca is None else "mutual TLS: client certificates required"

    def _bind(self, server: grpc.aio.Server) -> int:
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
        return int(port)

    def whenStarted(self) -> Deferred[None]:
        return self._started

    def stopService(self) -> Deferred[object]:
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return succeed(None)
        # Probes see NOT_SERVING first; then the streams end, so clients see a
        # clean end rather than a cancel.
        health = self.health.shut_down() if self.health is not None else succeed(None)
        self.servicer.end_streams()
        stopped = health.addCallback(
            lambda _: Deferred.fromFuture(asyncio.ensure_future(server.stop(self.grace)))
        )
        if self._refused_handshakes is not None:
            stopped.addBoth(self._stop_watching_handshakes)
        return stopped

    def _stop_watching_handshakes(self, result: object) -> object:
        assert self._refused_handshakes is not None
        self._refused_handshakes.stop()
        return result
