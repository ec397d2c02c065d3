"""The daemon's side of a refused stream, as a new user meets it (issue 11,
section 3): answered at once after start-up, told to the client in the
daemon's words, logged once per burst with a readable peer address."""

import asyncio
import io
import time

import grpc
import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher
from twisted.internet.testing import MemoryReactor

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.address import is_loopback, split_host_port
from aggregator.client import main as client_main
from aggregator.grpc_service import AggregatorServicer, GrpcServer, format_peer
from aggregator.merger import Merger
from aggregator.metrics_http import MetricsServer
from tests.aio import aio, within
from tests.fakes import FakeFeed


def test_peers_are_written_as_addresses():
    assert format_peer("ipv6:%5B::1%5D:40272") == "[::1]:40272"
    assert format_peer("ipv4:127.0.0.1:5000") == "127.0.0.1:5000"
    assert format_peer("unix:/run/x.sock") == "unix:/run/x.sock"


def test_addresses():
    assert split_host_port("[::1]:9051") == ("::1", 9051)
    with pytest.raises(ValueError, match=r"needs brackets: \[::1\]:9051"):
        split_host_port("::1:9051")
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "example.org")] == [
        True, True, True, False, False, False]


@pytest.fixture
def events():
    """Every log event while the test runs."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def warnings(events, text):
    return [e for e in events if e.get("log_level") is not None
            and e["log_level"].name == "warn" and text in e.get("log_format", "")]


@pytest.fixture
def loading_server():
    """A daemon whose binance symbol list never loads (the exchange is down);
    its start-up wait for the lists is 0.5 s."""
    merger = Merger([FakeFeed("binance")])
    merger.startService()
    server = GrpcServer("127.0.0.1:0", AggregatorServicer(merger, symbol_list_wait=0.5))
    server.startService()
    yield server
    pytest_twisted.blockon(server.stopService())
    merger.stopService()


async def refusal(port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = orderbook_pb2_grpc.AggregatorStub(channel).BookSummary(
            orderbook_pb2.Request(symbol="ethbtc"))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await within(call.read(), 5)
        return caught.value.code(), caught.value.details(), time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_after_start_up_a_missing_symbol_list_is_answered_at_once(loading_server, events):
    async def scenario():
        first = await refusal(loading_server.port)  # during start-up: waits for the list
        later = [await refusal(loading_server.port) for _ in range(3)]
        return first, later

    first, later = await aio(scenario())
    unavailable = (grpc.StatusCode.UNAVAILABLE, "symbol lists not loaded yet from: binance")
    assert first[:2] == unavailable and 0.3 < first[2] < 2
    for answer in later:
        assert answer[:2] == unavailable and answer[2] < 0.3
    # Four refusals within the burst window: one line, with the peer as typed.
    (logged,) = warnings(events, "stream refused")
    assert logged["code"] == "UNAVAILABLE" and logged["peer"].startswith("127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_the_client_shows_the_daemons_reason(loading_server):
    address = f"127.0.0.1:{loading_server.port}"
    out, err = io.StringIO(), io.StringIO()
    code = await aio(asyncio.to_thread(client_main, ["ethbtc", "--addr", address], out, err))
    assert (code, out.getvalue(), err.getvalue()) == (
        4, "", f"aggregator-client: the daemon at {address} is not ready: "
               "symbol lists not loaded yet from: binance\n")


def test_a_plaintext_port_beyond_loopback_is_warned_about(events):
    servicer = AggregatorServicer(Merger([FakeFeed("binance")]))
    for listen in ("127.0.0.1:9051", "[::1]:9051", "localhost:9051", "0.0.0.0:9051", "[::]:9051"):
        GrpcServer(listen, servicer).warn_if_exposed()
    assert [e["listen"] for e in warnings(events, "reachable beyond this machine")] == [
        "0.0.0.0:9051", "[::]:9051"]


def test_metrics_beyond_loopback_are_warned_about(events):
    for listen in ("127.0.0.1:9101", "0.0.0.0:9101"):
        server = MetricsServer(listen, MemoryReactor())
        server.startService()
        server.stopService()
    assert [e["listen"] for e in warnings(events, "reachable beyond this machine")] == [
        "0.0.0.0:9101"]
