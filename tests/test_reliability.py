"""Every fault the simulator can inject, end to end: simulator → daemon (built
by the twistd plugin) → real gRPC streams on loopback.

Each test injects one fault into a running system and asserts that, after
recovery, the merged books equal the simulator's true books exactly, that no
client stream broke, that the right thing was counted, and that no REST
request went over the exchange's budget. Backoff and timeouts are shortened
so recovery takes a fraction of a second.
"""

import dataclasses

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import reactor

from aggregator.book import BookState
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import Watcher, as_tuples, expected_from_simulator, start_daemon
from tests.reliability import counter, running_system, speed_up

SYMBOLS = ["ethbtc", "btcusdt"]


def fast(daemon):
    speed_up(daemon, ("binance", "bitstamp"), inactivity_timeout=1.0, handover_overlap=0.3)


async def gap_resynced(system, symbol, count=1):
    """Skip Binance update ids of `symbol`; returns once the daemon saw the gap."""
    before = counter("resyncs", exchange="binance", reason="gap")
    system.sim.skip_updates("binance", symbol, count)
    await wait_until(lambda: counter("resyncs", exchange="binance", reason="gap") > before)


@pytest.fixture
def system():
    yield from running_system(SYMBOLS, fast, seed=5)


@pytest_twisted.ensureDeferred
async def test_dropped_connection_reconnects_and_resyncs(system):
    before = counter("reconnects", exchange="binance")
    await system.sim.drop_clients("binance", rest=False)
    await aio(wait_until(lambda: counter("reconnects", exchange="binance") > before))
    await aio(system.settle())
    system.assert_streams_intact()
    system.assert_rest_within_budget()


@pytest_twisted.ensureDeferred
async def test_stalled_connection_is_detected_and_replaced(system):
    before = counter("reconnects", exchange="bitstamp")
    assert system.sim.stall("bitstamp") >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="bitstamp") > before, timeout=5))
    system.sim.unstall()
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_sequence_gap_resyncs_that_symbol(system):
    await aio(gap_resynced(system, "ethbtc", 3))
    await aio(system.settle())
    system.assert_streams_intact()
    system.assert_rest_within_budget()


@pytest.mark.parametrize("kind", ["malformed_json", "nan_price", "inf_price", "zero_price",
                                  "negative_amount", "wrong_types"])
@pytest.mark.parametrize("exchange", ["binance", "bitstamp"])
@pytest_twisted.ensureDeferred
async def test_bad_frames_are_rejected_counted_and_healed(system, exchange, kind):
    def total_rejects():
        return sum(s.value for m in REGISTRY.collect() if m.name == "aggregator_rejects"
                   for s in m.samples if s.name.endswith("_total") and s.labels["exchange"] == exchange)
    before = total_rejects()
    assert system.sim.send_bad_frame(exchange, "ethbtc", kind) >= 1
    await aio(wait_until(lambda: total_rejects() > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_bitstamp_request_reconnect_is_make_before_break(system):
    book = system.feed("bitstamp").books["ethbtc"]
    states = []
    original = book._set_state
    book._set_state = lambda state, reason: (states.append(state), original(state, reason))
    first = system.feed("bitstamp").connections[0]
    assert system.sim.request_reconnect(close_after=2.0) >= 1
    await aio(wait_until(lambda: system.feed("bitstamp").connections[0] is not first, timeout=5))
    await aio(system.settle())
    assert states == []  # never withdrawn: no gap for clients
    assert book.state is BookState.LIVE
    system.assert_streams_intact()


@pytest.mark.parametrize("code,reason", [(1001, "24h connection limit"), (1008, "Pong timeout")])
@pytest_twisted.ensureDeferred
async def test_binance_closing_the_connection_is_recovered(system, code, reason):
    before = counter("reconnects", exchange="binance")
    assert system.sim.close_clients("binance", code, reason) >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="binance") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_proactive_rotation_before_the_age_limit_keeps_books_live(system):
    feed = system.feed("binance")
    book = feed.books["ethbtc"]
    states = []
    original = book._set_state
    book._set_state = lambda state, reason: (states.append(state), original(state, reason))
    first = feed.connections[0]
    feed.rotate(first, "test: age limit")
    await aio(wait_until(lambda: feed.connections[0] is not first, timeout=5))
    await aio(system.settle())
    assert states == []
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_rate_limited_rest_is_honoured(system):
    system.sim.rest_fault("binance", [429], retry_after=0.5, path="/api/v3/depth")
    await aio(gap_resynced(system, "ethbtc"))  # forces a snapshot request
    await aio(system.settle())
    log = [r for r in system.sim.rest_log("binance") if r.path.startswith("/api/v3/depth")]
    refused = [r for r in log if r.status == 429]
    assert len(refused) == 1
    after = [r for r in log if r.time > refused[0].time]
    assert after and all(r.time >= refused[0].time + 0.5 for r in after)  # Retry-After honoured
    system.assert_rest_within_budget(forced=[("binance", 429)])  # and never a 418
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_stale_snapshot_is_detected_and_fetched_again(system):
    before = counter("resyncs", exchange="binance", reason="stale_snapshot")
    system.sim.stale_snapshot("binance", "ethbtc", updates_ago=20)
    system.sim.skip_updates("binance", "ethbtc", 1)
    await aio(wait_until(
        lambda: counter("resyncs", exchange="binance", reason="stale_snapshot") > before, timeout=5))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_slow_snapshots_are_bridged_by_buffered_diffs(system):
    system.sim.slow_rest("binance", 0.5, count=1)
    await aio(gap_resynced(system, "btcusdt"))
    await aio(system.settle())
    system.assert_streams_intact()
    system.assert_rest_within_budget()


@pytest_twisted.ensureDeferred
async def test_more_symbols_than_one_connection_carries():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=2, speed=2.0)
    sim.startService()

    def small_connections(daemon):
        fast(daemon)
        for name in ("binance", "bitstamp"):
            feed = daemon.getServiceNamed(name)
            feed.settings = dataclasses.replace(feed.settings, max_symbols_per_connection=2)

    daemon = await start_daemon(sim, configure=small_connections)
    symbols = sorted(sim.symbols("binance"))[:5]
    watcher = Watcher(daemon.getServiceNamed("grpc").port, symbols)
    try:
        sim_pause_done = False

        def exact():
            return all(s in watcher.latest and as_tuples(watcher.latest[s]) == expected_from_simulator(sim, s)
                       for s in symbols)

        binance = daemon.getServiceNamed("binance")
        await aio(wait_until(lambda: len([c for c in binance.connections if c.connected]) == 3, timeout=10))
        await aio(wait_until(lambda: all(b.live for b in binance.books.values()) and len(binance.books) == 5))
        sim.pause()
        sim_pause_done = True
        await aio(wait_until(exact, timeout=10))
        assert watcher.errors == []
    finally:
        if sim_pause_done:
            sim.resume()
        await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()
