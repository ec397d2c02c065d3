"""Simulator → daemon built by the twistd plugin → real gRPC clients, on loopback.

The expected books are computed here, independently of both the daemon and
the simulator: straight from the recorded files, or from the simulator's
true books with a reference merge.
"""

import asyncio

import grpc
import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.simulator import SimulatorService
from tests import recorded
from tests.aio import aio, wait_until
from tests.simclient import Reference
from tests.e2e import DEPTH, Watcher, as_tuples, expected_from_simulator, reference_top, start_daemon


def recorded_binance_books() -> dict:
    books, last_ids = {}, {}
    for line in recorded.read("BINANCE.http.0.0"):
        symbol = line.url.split("symbol=")[1].split("&")[0].lower()
        snapshot = orjson.loads(line.payload)
        books[symbol] = Reference(snapshot["bids"], snapshot["asks"])
        last_ids[symbol] = snapshot["lastUpdateId"]
    for line in recorded.read("BINANCE.ws.1.0"):
        if line.kind != "recv":
            continue
        message = orjson.loads(line.payload)
        if not message["stream"].endswith("@depth@100ms"):
            continue
        data = message["data"]
        symbol = data["s"].lower()
        if data["u"] > last_ids[symbol]:
            books[symbol].apply(data["b"], data["a"])
    return {symbol: book.sides for symbol, book in books.items()}


def recorded_bitstamp_books() -> dict:
    books, times = {}, {}
    for line in recorded.read("BITSTAMP.http.0.0"):
        pair = line.url.rstrip("/").rsplit("/", 1)[1]
        snapshot = orjson.loads(line.payload)
        books[pair] = Reference(snapshot["bids"], snapshot["asks"])
        times[pair] = int(snapshot["microtimestamp"])
    for line in recorded.read("BITSTAMP.ws.1.0"):
        if line.kind != "recv":
            continue
        message = orjson.loads(line.payload)
        if message.get("event") != "data" or not message["channel"].startswith("diff_order_book_"):
            continue
        pair = message["channel"][len("diff_order_book_"):]
        if int(message["data"]["microtimestamp"]) > times[pair]:
            books[pair].apply(message["data"]["bids"], message["data"]["asks"])
    return {pair: book.sides for pair, book in books.items()}


@pytest_twisted.ensureDeferred
async def test_recorded_replay_end_to_end_matches_books_computed_from_the_recording():
    binance, bitstamp = recorded_binance_books(), recorded_bitstamp_books()
    expected = {s: reference_top({"binance": b}) for s, b in binance.items()}
    expected.update({s: reference_top({"bitstamp": b}) for s, b in bitstamp.items()})
    sim = SimulatorService(reactor=reactor, source="recorded", speed=10.0, loop=False)
    sim.startService()
    daemon = await start_daemon(sim)
    watcher = Watcher(daemon.getServiceNamed("grpc").port, sorted(expected))
    try:
        def done():
            return sim.finished and all(
                s in watcher.latest and as_tuples(watcher.latest[s]) == expected[s] for s in expected)
        try:
            await aio(wait_until(done, timeout=20))
        except AssertionError:
            for s in expected:
                got = as_tuples(watcher.latest[s]) if s in watcher.latest else None
                assert got == expected[s], s
            raise
        assert watcher.errors == []
        for symbol, (bids, asks) in expected.items():
            summary = watcher.latest[symbol]
            assert summary.spread == asks[0][1] - bids[0][1]
            assert len(bids) == len(asks) == DEPTH
        # The diffs really flowed through the stream, not just final snapshots.
        assert watcher.counts["nknusdt"] >= 5 and watcher.counts["ethusd"] >= 5
    finally:
        await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_synthetic_books_merge_across_both_exchanges():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=7, speed=5.0, loop=False)
    sim.startService()
    symbols = ["ethbtc", "btcusdt"]
    daemon = await start_daemon(sim)
    watcher = Watcher(daemon.getServiceNamed("grpc").port, ["ETH-BTC", "btcusdt"])
    try:
        def expected(symbol):
            return expected_from_simulator(sim, symbol)

        def done():
            return sim.finished and all(
                s in watcher.latest and as_tuples(watcher.latest[s]) == expected(s.replace("-", "").lower())
                for s in ("ETH-BTC", "btcusdt"))
        await aio(wait_until(done, timeout=30))
        for shown, symbol in zip(("ETH-BTC", "btcusdt"), symbols):
            summary = watcher.latest[shown]
            assert {l.exchange for l in summary.bids} >= {"binance", "bitstamp"}
            assert {l.exchange for l in summary.asks} >= {"binance", "bitstamp"}
            assert summary.spread == summary.asks[0].price - summary.bids[0].price
        assert watcher.errors == []
    finally:
        await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_five_venues_merge_exactly_and_each_stream_view_is_exact():
    """ethbtc on all five venues, btcusd on three: the merged top N equals a merge of
    the simulator's true books; streams narrowed to some venues or fewer levels equal
    the same merge of just those books."""
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=11, speed=5.0, loop=False)
    sim.startService()
    daemon = await start_daemon(sim)
    port = daemon.getServiceNamed("grpc").port
    watcher = Watcher(port, ["ethbtc", "btcusd"])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = orderbook_pb2_grpc.AggregatorStub(channel)
    narrow = {"latest": None}

    async def read_narrow(call):
        async for summary in call:
            narrow["latest"] = summary

    try:
        async def scenario():
            call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc", exchanges=["kraken", "bybit"], depth=3))
            reader = asyncio.ensure_future(read_narrow(call))

            def narrow_expected():
                books = {}
                for exchange in ("kraken", "bybit"):
                    bids, asks = sim.true_book(exchange, "ethbtc")
                    books[exchange] = (dict(bids), dict(asks))
                return reference_top(books, 3)

            def done():
                return sim.finished and all(
                    s in watcher.latest and as_tuples(watcher.latest[s]) == expected_from_simulator(sim, s)
                    for s in ("ethbtc", "btcusd")
                ) and narrow["latest"] is not None and as_tuples(narrow["latest"]) == narrow_expected()

            await wait_until(done, timeout=40)
            states = {e.exchange: e.state for e in watcher.latest["ethbtc"].exchanges}
            assert states == {name: orderbook_pb2.ExchangeState.LIVE
                              for name in ("binance", "bitstamp", "bybit", "coinbase", "kraken")}
            assert {e.exchange for e in watcher.latest["btcusd"].exchanges} == {"bitstamp", "coinbase", "kraken"}
            assert {e.exchange for e in narrow["latest"].exchanges} == {"bybit", "kraken"}
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)

        await aio(scenario())
        assert watcher.errors == []
    finally:
        await aio(watcher.close())
        await aio(channel.close())
        await daemon.stopService()
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_unknown_symbol_is_not_found_and_leaving_clients_unsubscribe():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    daemon = await start_daemon(sim)
    port = daemon.getServiceNamed("grpc").port
    try:
        async def scenario():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = orderbook_pb2_grpc.AggregatorStub(channel)
            call = stub.BookSummary(orderbook_pb2.Request(symbol="nosuchcoin"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            assert "nosuchcoin" in caught.value.details()
            call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
            await call.read()
            feeds = [daemon.getServiceNamed(n) for n in ("binance", "bitstamp")]
            await wait_until(lambda: all("ethbtc" in f.books for f in feeds))
            call.cancel()
            await wait_until(lambda: all("ethbtc" not in f.books for f in feeds))
            await channel.close()

        await aio(scenario())
    finally:
        await daemon.stopService()
        await sim.stopService()
