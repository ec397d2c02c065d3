"""The gRPC ecosystem and compatibility: reflection, the challenge API
(orderbook.OrderbookAggregator), and the additive Summary fields that clients
of the original contract ignore."""

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import reactor

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.book import BookState
from aggregator.merger import serialize_summary
from aggregator.simulator import SimulatorService
from tests.aio import aio, within
from tests.e2e import start_daemon

ROOT = Path(__file__).resolve().parent.parent

# The contract as the original clients were built from it.
ORIGINAL_PROTO = """
syntax = "proto3";
package orderbook;
service OrderbookAggregator { rpc BookSummary(Empty) returns (stream Summary); }
message Empty {}
message Summary { double spread = 1; repeated Level bids = 2; repeated Level asks = 3; }
message Level { string exchange = 1; double price = 2; double amount = 3; }
"""


def original_summary_class(tmp_path):
    """Summary as compiled from ORIGINAL_PROTO, in a pool of its own."""
    (tmp_path / "original.proto").write_text(ORIGINAL_PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}",
         f"--descriptor_set_out={tmp_path / 'original.pb'}", "original.proto"],
        check=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "original.pb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("orderbook.Summary"))


def test_original_clients_read_new_summaries_and_skip_the_new_fields(tmp_path):
    data = serialize_summary(
        [("binance", 0.05, 1.5)],
        [("bitstamp", 0.051, 2.0)],
        [("binance", BookState.LIVE, "in sync"), ("bitstamp", BookState.STALE, "gap")],
        1_700_000_000_000_000,
    )
    old = original_summary_class(tmp_path).FromString(data)
    assert old.spread == pytest.approx(0.001)
    assert [(l.exchange, l.price, l.amount) for l in old.bids] == [("binance", 0.05, 1.5)]
    assert [(l.exchange, l.price, l.amount) for l in old.asks] == [("bitstamp", 0.051, 2.0)]
    new = orderbook_pb2.Summary.FromString(data)
    assert [(e.exchange, e.state, e.reason) for e in new.exchanges] == [
        ("binance", orderbook_pb2.ExchangeState.LIVE, "in sync"),
        ("bitstamp", orderbook_pb2.ExchangeState.STALE, "gap"),
    ]
    assert new.timestamp_us == 1_700_000_000_000_000


@pytest.fixture
def sim():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    yield sim
    pytest_twisted.blockon(sim.stopService())


async def merged(call, timeout=15):
    """Reads until a Summary shows both exchanges' levels."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = await within(call.read(), timeout)
        if {l.exchange for l in summary.bids} >= {"binance", "bitstamp"}:
            return summary
    raise AssertionError("no merged Summary")


@pytest_twisted.ensureDeferred
async def test_challenge_api_streams_the_default_symbol(sim):
    daemon = await start_daemon(sim)
    port = daemon.getServiceNamed("grpc").port
    before_us = time.time_ns() // 1000
    try:
        async def scenario():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = orderbook_pb2_grpc.OrderbookAggregatorStub(channel)
            call = stub.BookSummary(orderbook_pb2.Empty())
            summary = await merged(call)
            assert summary.spread == summary.asks[0].price - summary.bids[0].price
            # The additive fields, filled in.
            # (Other registered venues listing ethbtc take part too.)
            states = {e.exchange: e.state for e in summary.exchanges}
            assert {n: states[n] for n in ("binance", "bitstamp")} == {
                "binance": orderbook_pb2.ExchangeState.LIVE,
                "bitstamp": orderbook_pb2.ExchangeState.LIVE,
            }
            assert before_us <= summary.timestamp_us <= time.time_ns() // 1000
            # It is ethbtc: the same book the symbol API streams.
            feeds = [daemon.getServiceNamed(n) for n in ("binance", "bitstamp")]
            assert all(set(f.books) == {"ethbtc"} for f in feeds)
            call.cancel()
            await channel.close()

        await aio(scenario())
    finally:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_default_symbol_option(sim):
    daemon = await start_daemon(sim, "--default-symbol", "BTC-USDT")
    port = daemon.getServiceNamed("grpc").port
    try:
        async def scenario():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            call = orderbook_pb2_grpc.OrderbookAggregatorStub(channel).BookSummary(orderbook_pb2.Empty())
            summary = await merged(call)
            assert summary.bids[0].price > 1000  # btcusdt, not ethbtc
            assert set(daemon.getServiceNamed("binance").books) == {"btcusdt"}
            call.cancel()
            await channel.close()

        await aio(scenario())
    finally:
        await daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_reflection_lists_both_services_and_describes_them(sim):
    daemon = await start_daemon(sim)
    port = daemon.getServiceNamed("grpc").port
    try:
        async def scenario():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="orderbook.OrderbookAggregator"),
            ]
            listed, described = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            names = {s.name for s in listed.list_services_response.service}
            assert names == {
                "orderbook.Aggregator", "orderbook.OrderbookAggregator",
                "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
            }
            (raw,) = described.file_descriptor_response.file_descriptor_proto
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            methods = {(s.name, m.name, m.input_type, m.output_type, m.server_streaming)
                       for s in file.service for m in s.method}
            assert methods == {
                ("Aggregator", "BookSummary", ".orderbook.Request", ".orderbook.Summary", True),
                ("OrderbookAggregator", "BookSummary", ".orderbook.Empty", ".orderbook.Summary", True),
            }
            (summary,) = [m for m in file.message_type if m.name == "Summary"]
            assert {f.name: f.number for f in summary.field} == {
                "spread": 1, "bids": 2, "asks": 3, "exchanges": 4, "timestamp_us": 5}
            await channel.close()

        await aio(scenario())
    finally:
        await daemon.stopService()
