"""Limits: what clients can make the daemon hold. Streams and distinct symbols
are capped (RESOURCE_EXHAUSTED with a message), and keepalive frees the
streams of clients that vanished without closing."""

import grpc
import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import protocol, reactor
from twisted.python import usage

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.grpc_service import AggregatorServicer, GrpcServer, Keepalive, Limits
from aggregator.merger import Merger
from tests.aio import aio, wait_until, within
from tests.e2e import plugin
from tests.fakes import FakeFeed


@pytest.fixture
def merger():
    feeds = [FakeFeed("binance", {"ethbtc", "btcusdt", "ethusdt"}), FakeFeed("bitstamp", {"ethbtc"})]
    merger = Merger(feeds, depth=10)
    merger.startService()
    yield merger
    merger.stopService()


def serve(merger, limits=Limits(), keepalive=Keepalive()):
    server = GrpcServer("127.0.0.1:0", AggregatorServicer(merger, limits=limits), keepalive=keepalive)
    server.startService()
    return server


async def refusal(call):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await within(call.read(), 5)
    return caught.value.code(), caught.value.details()


def refused(code):
    return REGISTRY.get_sample_value("aggregator_streams_refused_total", {"code": code}) or 0.0


@pytest_twisted.ensureDeferred
async def test_streams_beyond_the_limit_are_refused_on_both_apis(merger):
    server = serve(merger, Limits(max_streams=2))
    before = refused("resource_exhausted")

    async def scenario():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        compat = orderbook_pb2_grpc.OrderbookAggregatorStub(channel)
        first = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
        second = compat.BookSummary(orderbook_pb2.Empty())
        await within(first.read(), 5)
        await within(second.read(), 5)
        for extra in (stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc")),
                      compat.BookSummary(orderbook_pb2.Empty())):
            assert await refusal(extra) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many streams: the daemon serves at most 2 at once")
        first.cancel()
        await wait_until(lambda: server.servicer.streams == 1)
        third = stub.BookSummary(orderbook_pb2.Request(symbol="btcusdt"))
        await within(third.read(), 5)
        await channel.close()

    try:
        await aio(scenario())
    finally:
        await server.stopService()
    assert refused("resource_exhausted") - before == 2


@pytest_twisted.ensureDeferred
async def test_distinct_symbols_beyond_the_limit_are_refused_before_any_exchange_is_asked(merger):
    server = serve(merger, Limits(max_symbols=1))
    binance = merger.feeds["binance"]

    async def scenario():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        a = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
        b = stub.BookSummary(orderbook_pb2.Request(symbol="ETH-BTC"))  # the same symbol
        await within(a.read(), 5)
        await within(b.read(), 5)
        code, details = await refusal(stub.BookSummary(orderbook_pb2.Request(symbol="btcusdt")))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "cannot watch 'btcusdt': the daemon already watches its limit of 1 symbols"
        assert binance.watched == ["ethbtc"]
        a.cancel()
        b.cancel()
        await wait_until(lambda: binance.unwatched == ["ethbtc"])
        c = stub.BookSummary(orderbook_pb2.Request(symbol="btcusdt"))
        await within(c.read(), 5)
        assert binance.watched == ["ethbtc", "btcusdt"]
        await channel.close()

    try:
        await aio(scenario())
    finally:
        await server.stopService()


def test_limit_options_are_checked():
    options = plugin().options()
    options.parseOptions([])
    assert (options["max-streams"], options["max-symbols"]) == (1000, 100)
    for argv, message in [
        (["--max-streams", "0"], "--max-streams must be at least 1"),
        (["--max-symbols", "0"], "--max-symbols must be at least 1"),
        (["--max-symbols", "1", "--symbols", "ethbtc,btcusdt"], "more symbols than --max-symbols"),
        (["--default-symbol", "eth$btc"], "--default-symbol: malformed symbol"),
        (["--keepalive", "0"], "must be positive"),
        (["--metrics", "host"], "--metrics: expected host:port"),
        (["--log-format", "xml"], "--log-format must be text or json"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            plugin().options().parseOptions(argv)


class _Relay(protocol.Protocol):
    """One side of a loopback TCP relay that can go silent, like a cut cable:
    the sockets stay open, nothing gets through any more."""

    def __init__(self, cut):
        self.cut = cut
        self.peer = None
        self.buffered = []

    def connectionMade(self):
        if self.peer is None:  # the client side: dial the server
            server_side = _Relay(self.cut)
            server_side.peer = self
            self.peer = server_side
            self.transport.pauseProducing()
            protocol.ClientCreator(reactor, lambda: server_side).connectTCP(
                "127.0.0.1", self.cut.target_port)
        else:  # the server side, connected
            self.peer.transport.resumeProducing()

    def dataReceived(self, data):
        if not self.cut.silent:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class CuttableLink(protocol.ServerFactory):
    def __init__(self, target_port):
        self.target_port = target_port
        self.silent = False

    def buildProtocol(self, addr):
        return _Relay(self)


@pytest_twisted.ensureDeferred
async def test_keepalive_frees_the_stream_of_a_client_that_vanished(merger):
    server = serve(merger, keepalive=Keepalive(interval=0.3, timeout=0.3))
    link = CuttableLink(server.port)
    listening = reactor.listenTCP(0, link, interface="127.0.0.1")
    binance = merger.feeds["binance"]

    async def scenario():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{listening.getHost().port}")
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        call = stub.BookSummary(orderbook_pb2.Request(symbol="btcusdt"))
        await within(call.read(), 5)
        assert server.servicer.streams == 1
        link.silent = True
        # Pings unanswered: the server drops the connection, the stream and its demand.
        await wait_until(lambda: server.servicer.streams == 0, timeout=5)
        await wait_until(lambda: binance.unwatched == ["btcusdt"], timeout=1)
        call.cancel()
        await channel.close()

    try:
        await aio(scenario())
    finally:
        await server.stopService()
        await listening.stopListening()
