import math

import grpc
import pytest
import pytest_twisted

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.grpc_service import AggregatorServicer, CannotListen, GrpcServer
from aggregator.merger import Merger
from tests.aio import aio, within
from tests.fakes import FakeFeed, publish


@pytest.fixture
def merger():
    feeds = [FakeFeed("binance", {"ethbtc", "btcusdt"}), FakeFeed("bitstamp", {"ethbtc"})]
    merger = Merger(feeds, depth=10)
    merger.startService()
    yield merger
    merger.stopService()


@pytest.fixture
def server(merger):
    server = GrpcServer("127.0.0.1:0", AggregatorServicer(merger, symbol_list_wait=0.2))
    server.startService()
    yield server
    if server.running:
        pytest_twisted.blockon(server.stopService())


def stub_for(server):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, orderbook_pb2_grpc.AggregatorStub(channel)


@pytest_twisted.ensureDeferred
async def test_stream_starts_with_current_summary_then_updates(server, merger):
    channel, stub = stub_for(server)

    async def scenario():
        call = stub.BookSummary(orderbook_pb2.Request(symbol="ETH/BTC"))
        first = await within(call.read(), 5)
        assert not first.bids and math.isnan(first.spread)
        publish(merger.feeds["binance"].books["ethbtc"], [(0.05, 1.0)], [(0.051, 2.0)])
        second = await within(call.read(), 5)
        assert [(l.exchange, l.price, l.amount) for l in second.bids] == [("binance", 0.05, 1.0)]
        assert second.spread == pytest.approx(0.001)
        call.cancel()
        await channel.close()

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_errors_map_to_status_codes(server):
    channel, stub = stub_for(server)

    async def status_of(symbol):
        call = stub.BookSummary(orderbook_pb2.Request(symbol=symbol))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await within(call.read(), 5)
        return caught.value.code(), caught.value.details()

    async def scenario():
        assert await status_of("nosuch") == (
            grpc.StatusCode.NOT_FOUND,
            "symbol 'nosuch' is not listed by any enabled exchange (binance, bitstamp)")
        code, details = await status_of("")
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "empty" in details
        code, details = await status_of("eth$btc")
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
        code, _ = await status_of("x" * 200)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        await channel.close()

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_symbol_lists_still_loading_is_unavailable():
    merger = Merger([FakeFeed("binance")])
    merger.startService()
    server = GrpcServer("127.0.0.1:0", AggregatorServicer(merger, symbol_list_wait=0.1))
    server.startService()
    channel, stub = stub_for(server)

    async def scenario():
        call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await within(call.read(), 5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "binance" in caught.value.details()
        await channel.close()

    await aio(scenario())
    await server.stopService()


@pytest_twisted.ensureDeferred
async def test_client_disconnect_releases_demand(server, merger):
    channel, stub = stub_for(server)
    binance = merger.feeds["binance"]

    async def scenario():
        call = stub.BookSummary(orderbook_pb2.Request(symbol="btcusdt"))
        await within(call.read(), 5)
        assert binance.watched == ["btcusdt"]
        call.cancel()
        await channel.close()
        for _ in range(100):
            if binance.unwatched:
                break
            await __import__("asyncio").sleep(0.01)

    await aio(scenario())
    assert binance.unwatched == ["btcusdt"]
    assert server.servicer.subscriptions == set()


@pytest_twisted.ensureDeferred
async def test_stop_ends_streams_cleanly(server, merger):
    channel, stub = stub_for(server)

    async def scenario():
        call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
        await within(call.read(), 5)
        return call

    call = await aio(scenario())
    await server.stopService()

    async def ended():
        assert await within(call.read(), 5) is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
        await channel.close()

    await aio(ended())


def test_port_in_use_is_a_clear_error(server, merger):
    second = GrpcServer(f"127.0.0.1:{server.port}", AggregatorServicer(merger))
    with pytest.raises(CannotListen, match=f"127.0.0.1:{server.port}"):
        second.startService()
    assert not second.running


@pytest_twisted.ensureDeferred
async def test_request_exchanges_and_depth_choose_the_stream(server, merger):
    channel, stub = stub_for(server)

    async def scenario():
        only_bitstamp = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc", exchanges=["bitstamp"]))
        top_one = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc", depth=1))
        await within(only_bitstamp.read(), 5)
        await within(top_one.read(), 5)
        publish(merger.feeds["bitstamp"].books["ethbtc"], [(0.05, 1.0), (0.04, 1.0)], [(0.06, 1.0)])
        summary = await within(only_bitstamp.read(), 5)
        assert [(l.exchange, l.price) for l in summary.bids] == [("bitstamp", 0.05), ("bitstamp", 0.04)]
        assert [s.exchange for s in summary.exchanges] == ["bitstamp"]
        summary = await within(top_one.read(), 5)
        assert [(l.exchange, l.price) for l in summary.bids] == [("bitstamp", 0.05)]
        only_bitstamp.cancel()
        top_one.cancel()

        async def status_of(request):
            call = stub.BookSummary(request)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await within(call.read(), 5)
            return caught.value.code(), caught.value.details()

        code, details = await status_of(orderbook_pb2.Request(symbol="ethbtc", exchanges=["nosuch"]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "'nosuch'" in details
        code, details = await status_of(orderbook_pb2.Request(symbol="ethbtc", depth=11))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "--depth 10" in details
        code, details = await status_of(orderbook_pb2.Request(symbol="btcusdt", exchanges=["bitstamp"]))
        assert code is grpc.StatusCode.NOT_FOUND and "bitstamp" in details
        await channel.close()

    await aio(scenario())
