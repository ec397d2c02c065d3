"""gRPC front: requests → demand and subscribers, errors → status codes.

No book logic here. Summaries arrive already serialized (once per change, for
every client), so the handler is registered with an identity serializer.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from aggregator._proto import orderbook_pb2
from aggregator.merger import Merger, Subscription, SymbolListsUnavailable, UnknownSymbol
from aggregator.symbols import InvalidSymbol, normalize

SERVICE_NAME = "orderbook.Aggregator"


class CannotListen(RuntimeError):
    pass


class AggregatorServicer:
    log = Logger()

    def __init__(self, merger: Merger, symbol_list_wait: float = 5.0) -> None:
        self.merger = merger
        self.symbol_list_wait = symbol_list_wait
        self.subscriptions: set[Subscription] = set()

    async def BookSummary(
        self, request: orderbook_pb2.Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            symbol = normalize(request.symbol)
        except InvalidSymbol as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        subscription = await self._subscribe(symbol, context)
        self.subscriptions.add(subscription)
        # Read now: context.peer() on a finished call crashes the process (grpcio 1.85).
        peer = context.peer()
        self.log.info("stream opened: {symbol} for {peer}", symbol=symbol, peer=peer)
        loop = asyncio.get_running_loop()
        try:
            while True:
                summary = await subscription.next().asFuture(loop)
                if summary is None:
                    return
                yield summary
        finally:
            self.subscriptions.discard(subscription)
            subscription.close()
            self.log.info("stream closed: {symbol} for {peer}", symbol=symbol, peer=peer)

    async def _subscribe(self, symbol: str, context: grpc.aio.ServicerContext) -> Subscription:
        try:
            return self.merger.subscribe(symbol)
        except UnknownSymbol as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except SymbolListsUnavailable:
            pass
        # Just started: wait a little for the exchanges' symbol lists.
        loaded = self.merger.when_symbol_lists_loaded()
        loaded.addErrback(lambda failure: failure.trap(CancelledError))  # our timeout
        try:
            await asyncio.wait_for(loaded.asFuture(asyncio.get_running_loop()), self.symbol_list_wait)
        except asyncio.TimeoutError:
            pass
        try:
            return self.merger.subscribe(symbol)
        except UnknownSymbol as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except SymbolListsUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        raise AssertionError("unreachable: context.abort raises")

    def end_streams(self) -> None:
        for subscription in list(self.subscriptions):
            subscription.end()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        book_summary = grpc.unary_stream_rpc_method_handler(
            self.BookSummary,
            request_deserializer=orderbook_pb2.Request.FromString,
            response_serializer=None,  # already bytes
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"BookSummary": book_summary})


class GrpcServer(Service):
    """grpc.aio server, created in startService: twistd forks between
    makeService and startService, and gRPC must not be set up before a fork.
    """

    log = Logger()

    def __init__(self, listen: str, servicer: AggregatorServicer, grace: float = 0.5) -> None:
        self.listen = listen
        self.servicer = servicer
        self.grace = grace
        self.port: int | None = None
        self._server: Any = None
        self._started: Deferred = succeed(None)

    def startService(self) -> None:
        # Two daemons must not silently share a port (SO_REUSEPORT is on by default).
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self.servicer.generic_handler(),))
        try:
            port = server.add_insecure_port(self.listen)
        except RuntimeError as error:
            raise CannotListen(f"cannot listen for gRPC on {self.listen}: {error}") from None
        if port == 0:
            raise CannotListen(
                f"cannot listen for gRPC on {self.listen}: address in use or unavailable"
            )
        super().startService()
        self._server = server
        self.port = port
        self._started = Deferred.fromFuture(asyncio.ensure_future(server.start()))
        self.log.info("gRPC listening on {listen} (port {port})", listen=self.listen, port=port)

    def whenStarted(self) -> Deferred:
        return self._started

    def stopService(self) -> Deferred:
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return succeed(None)
        # End the streams first so clients see a clean end rather than a cancel.
        self.servicer.end_streams()
        return Deferred.fromFuture(asyncio.ensure_future(server.stop(self.grace)))
