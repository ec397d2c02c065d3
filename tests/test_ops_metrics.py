"""Prometheus metrics: the gRPC/merger-side counters, the HTTP endpoint, and a
scrape of a real daemon while a client streams."""

import socket

import grpc
import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import reactor
from twisted.internet.task import Clock

from aggregator import __version__, metrics
from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.address import CannotListen
from aggregator.grpc_service import AggregatorServicer, GrpcServer
from aggregator.merger import Merger
from aggregator.metrics_http import MetricsServer
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until, within
from tests.e2e import start_daemon
from tests.fakes import FakeFeed
from tests.ops import scrape


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_arrival_travels_with_the_change_it_caused_and_only_with_it():
    """The first Summary after a snapshot carries no arrival (a REST round
    trip is not frame-to-Summary latency); a committed frame carries its own."""
    feed = FakeFeed("binance", {"ethbtc"})
    merger = Merger([feed], depth=5)
    merger.startService()
    subscription = merger.subscribe("ethbtc")
    subscription.take()
    book = feed.books["ethbtc"]
    book.book.replace([(10.0, 1.0)], [])
    book.go_live()  # a snapshot made it live: no frame behind it
    assert subscription.take() is not None and subscription.arrival is None
    book.book.apply([(10.0, 2.0)], [])
    book.commit(12.5)
    assert subscription.take() is not None and subscription.arrival == 12.5
    book.mark_stale("disconnected")
    assert subscription.take() is not None and subscription.arrival is None
    merger.stopService()


@pytest.fixture
def merger():
    merger = Merger([FakeFeed("binance", {"ethbtc"})], depth=5)
    merger.startService()
    yield merger
    merger.stopService()


def test_superseded_summaries_are_counted_as_conflated(merger):
    book_of = lambda: merger.feeds["binance"].books["ethbtc"]
    before = value("aggregator_summaries_conflated_total")
    slow = merger.subscribe("ethbtc")  # holds the initial Summary, never reads
    book_of().book.replace([(10.0, 1.0)], [])
    book_of().go_live()
    book_of().book.apply([(10.0, 2.0)], [])
    book_of().commit(None)
    assert value("aggregator_summaries_conflated_total") - before == 2
    assert slow.conflated == 2
    slow.close()


@pytest_twisted.ensureDeferred
async def test_streams_sent_summaries_and_latency_from_frame_arrival(merger):
    clock = Clock()
    clock.advance(1000)
    server = GrpcServer("127.0.0.1:0", AggregatorServicer(merger, clock=clock))
    server.startService()
    book_of = lambda: merger.feeds["binance"].books["ethbtc"]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = orderbook_pb2_grpc.AggregatorStub(channel)
    active = value("aggregator_active_streams")
    sent = value("aggregator_summaries_sent_total")
    latency_count = value("aggregator_update_latency_seconds_count")
    latency_sum = value("aggregator_update_latency_seconds_sum")

    async def scenario():
        call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
        await within(call.read(), 5)  # the current Summary: old news, no latency
        assert value("aggregator_active_streams") == active + 1
        assert value("aggregator_update_latency_seconds_count") == latency_count
        # A frame arrives, makes the book live; gRPC gets the Summary 3 ms later.
        book_of().book.replace([(10.0, 1.0)], [(11.0, 1.0)])
        book_of().go_live(arrival=clock.seconds())
        clock.advance(0.003)
        await within(call.read(), 5)
        assert value("aggregator_update_latency_seconds_count") == latency_count + 1
        assert value("aggregator_update_latency_seconds_sum") - latency_sum == pytest.approx(0.003)
        # No frame behind this one (a disconnect, say): sent, but no latency sample.
        book_of().mark_stale("disconnected")
        await within(call.read(), 5)
        assert value("aggregator_update_latency_seconds_count") == latency_count + 1
        assert value("aggregator_summaries_sent_total") == sent + 3
        call.cancel()
        await wait_until(lambda: value("aggregator_active_streams") == active)
        await channel.close()

    try:
        await aio(scenario())
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_serves_text_and_openmetrics():
    server = MetricsServer("127.0.0.1:0", reactor)
    server.startService()
    try:
        samples = await scrape(server.port)
        # event_loop too, once the options installed the reactor (--loop).
        (build,) = [(dict(labels), value) for (name, labels), value in samples.items()
                    if name == "aggregator_build_info"]
        assert build[0]["version"] == __version__ and build[1] == 1.0
        import treq

        response = await treq.get(
            f"http://127.0.0.1:{server.port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            reactor=reactor,
        )
        assert response.headers.getRawHeaders("content-type")[0].startswith(
            "application/openmetrics-text"
        )
        assert (await treq.content(response)).endswith(b"# EOF\n")
        missing = await treq.get(f"http://127.0.0.1:{server.port}/other", reactor=reactor)
        assert missing.code == 404
        await treq.content(missing)
    finally:
        await server.stopService()


def test_metrics_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(f"127.0.0.1:{port}", reactor)
        with pytest.raises(CannotListen, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            server.startService()
        assert not server.running


EXPECTED_FAMILIES = {
    "aggregator_messages", "aggregator_rejects", "aggregator_resyncs", "aggregator_reconnects",
    "aggregator_book_state", "aggregator_active_streams", "aggregator_summaries_sent",
    "aggregator_summaries_conflated", "aggregator_update_latency_seconds",
    "aggregator_streams_refused", "aggregator_build_info",
}


@pytest_twisted.ensureDeferred
async def test_scraping_a_daemon_while_a_client_streams():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    daemon = await start_daemon(sim, "--metrics", "127.0.0.1:0")
    port = daemon.getServiceNamed("metrics").port
    grpc_port = daemon.getServiceNamed("grpc").port
    try:
        before = await scrape(port)
        assert EXPECTED_FAMILIES <= before.families
        # Besides prometheus_client's standard process_* and python_* ones.
        ours = {f for f in before.families if not f.startswith(("process_", "python_"))}
        assert all(family.startswith("aggregator_") for family in ours), ours

        async def stream_some():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
            stub = orderbook_pb2_grpc.AggregatorStub(channel)
            call = stub.BookSummary(orderbook_pb2.Request(symbol="ethbtc"))
            for _ in range(5):
                await within(call.read(), 10)
            return channel, call

        channel, call = await aio(stream_some())
        during = await scrape(port)
        sent = ("aggregator_summaries_sent_total", ())
        assert during[sent] - before.get(sent, 0) >= 5
        assert during[("aggregator_active_streams", ())] - before[("aggregator_active_streams", ())] == 1
        for exchange in ("binance", "bitstamp"):
            messages = ("aggregator_messages_total", (("exchange", exchange),))
            assert during[messages] > before.get(messages, 0)
            live = ("aggregator_book_state",
                    (("aggregator_book_state", "live"), ("exchange", exchange), ("symbol", "ethbtc")))
            assert during[live] == 1.0
        latency = ("aggregator_update_latency_seconds_bucket", (("le", "+Inf"),))
        assert latency in during

        call.cancel()
        await aio(channel.close())
        await aio(wait_until(lambda: daemon.getServiceNamed("grpc").servicer.streams == 0))
        after = await scrape(port)
        assert after[("aggregator_active_streams", ())] == before[("aggregator_active_streams", ())]
    finally:
        await daemon.stopService()
        await sim.stopService()


class _Accept:
    def __init__(self, accept):
        self.accept = accept
        self.headers = {}

    def getHeader(self, name):
        return self.accept

    def setHeader(self, name, value):
        self.headers[name] = value


@pytest.mark.parametrize("openmetrics", [False, True])
def test_book_states_are_exposed_like_an_enum_in_both_formats(openmetrics):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    from aggregator.book import BookState, ExchangeBook
    from aggregator.metrics_http import MetricsResource

    states = metrics.BookStates()
    states.state("binance", "ethbtc", "syncing")
    states.state("bitstamp", 'odd"\\name\n', "live")
    states.state("binance", "ethbtc", "stale")  # a change replaces the book's lines
    states.state("binance", "btcusdt", "live")
    states.remove("binance", "btcusdt")  # a discarded book is gone
    resource = MetricsResource(REGISTRY, states)
    request = _Accept("application/openmetrics-text; version=1.0.0" if openmetrics else "")
    text = resource.render_GET(request).decode()
    families = {f.name: f for f in (parse_om if openmetrics else parse_text)(text)}
    assert "aggregator_messages" in families  # the registry's families are still there
    family = families["aggregator_book_state"]
    assert family.type == ("stateset" if openmetrics else "gauge")
    shown = {(s.labels["exchange"], s.labels["symbol"], s.labels["aggregator_book_state"]): s.value
             for s in family.samples}
    assert shown == {
        ("binance", "ethbtc", "syncing"): 0.0, ("binance", "ethbtc", "live"): 0.0,
        ("binance", "ethbtc", "stale"): 1.0,
        ("bitstamp", 'odd"\\name\n', "syncing"): 0.0, ("bitstamp", 'odd"\\name\n', "live"): 1.0,
        ("bitstamp", 'odd"\\name\n', "stale"): 0.0,
    }
    assert states.value("binance", "ethbtc") == "stale" and states.value("binance", "btcusdt") is None
    with pytest.raises(ValueError):
        states.state("binance", "ethbtc", "confused")
    # The daemon's books drive the daemon's family.
    book = ExchangeBook("binance", "xyzabc", lambda book, arrival: None)
    assert metrics.BOOK_STATE.value("binance", "xyzabc") == "syncing"
    book.withdraw(BookState.STALE, "test")
    assert metrics.BOOK_STATE.value("binance", "xyzabc") == "stale"
    book.discard()
    assert metrics.BOOK_STATE.value("binance", "xyzabc") is None
