"""Kraken's faults end to end: simulator → daemon (twistd plugin) → gRPC streams.

Each test injects one fault into the running system and asserts that, after
recovery, the merged books equal the simulator's true books exactly (every
venue listing the symbol merged), that no client stream broke, and that the
right counter moved. Kraken has no sequence numbers: a lost update and a
wrong checksum are both found by the checksum, and healed by a new
subscription (unsubscribe + subscribe → a fresh snapshot).
"""

import dataclasses

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from aggregator.book import BookState
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import Watcher, as_tuples, expected_from_simulator, start_daemon

SYMBOLS = ["btcusd", "ethbtc"]


def counter(name, **labels):
    return REGISTRY.get_sample_value(f"aggregator_{name}_total", labels) or 0.0


def fast(daemon):
    for name in ("binance", "bitstamp", "kraken"):
        feed = daemon.getServiceNamed(name)
        feed.retry_policy = lambda attempt: 0.05 * (attempt + 1)
        feed.settings = dataclasses.replace(
            feed.settings, inactivity_timeout=1.0, handover_overlap=0.3)


class System:
    def __init__(self, sim, daemon, watcher):
        self.sim, self.daemon, self.watcher = sim, daemon, watcher
        self.kraken = daemon.getServiceNamed("kraken")

    def live(self):
        return all(
            (book := self.kraken.books.get(symbol)) is not None and book.state is BookState.LIVE
            for symbol in SYMBOLS)

    def exact(self):
        return all(
            symbol in self.watcher.latest
            and as_tuples(self.watcher.latest[symbol]) == expected_from_simulator(self.sim, symbol)
            for symbol in SYMBOLS)

    async def settle(self, timeout=10.0):
        """Stop the market, then wait until every stream shows the true books."""
        await wait_until(self.live, timeout)
        self.sim.pause()
        await wait_until(self.exact, timeout)
        self.sim.resume()

    def assert_streams_intact(self):
        assert self.watcher.errors == []
        assert not any(call.done() for call in self.watcher.calls.values())

    def venue(self):
        return self.sim._venues["kraken"]


@pytest.fixture
def system():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=7, speed=2.0)
    sim.startService()
    daemon = pytest_twisted.blockon(ensureDeferred(start_daemon(sim, configure=fast)))
    watcher = Watcher(daemon.getServiceNamed("grpc").port, SYMBOLS)
    system = System(sim, daemon, watcher)
    pytest_twisted.blockon(aio(system.settle()))
    yield system
    pytest_twisted.blockon(aio(watcher.close()))
    pytest_twisted.blockon(daemon.stopService())
    pytest_twisted.blockon(sim.stopService())


def test_kraken_books_are_merged_with_the_others(system):
    # The fixture settled: the merge includes Kraken's book, exactly.
    assert "kraken" in {level.exchange for level in system.watcher.latest["btcusd"].bids}
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_wrong_checksum_resyncs_that_symbol(system):
    before = counter("resyncs", exchange="kraken", reason="checksum")
    system.venue().corrupt_next_checksum("btcusd")
    await aio(wait_until(lambda: counter("resyncs", exchange="kraken", reason="checksum") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_lost_updates_are_caught_by_the_checksum(system):
    before = counter("resyncs", exchange="kraken", reason="checksum")
    system.sim.skip_updates("kraken", "ethbtc", 3)
    await aio(wait_until(lambda: counter("resyncs", exchange="kraken", reason="checksum") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_stale_snapshot_is_caught_by_the_next_checksum(system):
    before = counter("resyncs", exchange="kraken", reason="checksum")
    system.sim.stale_snapshot("kraken", "btcusd", 10)
    # Dropping the connection makes the daemon subscribe again: that snapshot is the stale one.
    await system.sim.drop_clients("kraken", rest=False)
    await aio(wait_until(lambda: counter("resyncs", exchange="kraken", reason="checksum") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest.mark.parametrize("kind", ["malformed_json", "nan_price", "inf_price", "zero_price",
                                  "negative_amount", "wrong_types"])
@pytest_twisted.ensureDeferred
async def test_bad_frames_are_rejected_counted_and_healed(system, kind):
    def total_rejects():
        return sum(s.value for m in REGISTRY.collect() if m.name == "aggregator_rejects"
                   for s in m.samples if s.name.endswith("_total") and s.labels["exchange"] == "kraken")
    before = total_rejects()
    assert system.sim.send_bad_frame("kraken", "ethbtc", kind) >= 1
    await aio(wait_until(lambda: total_rejects() > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_dropped_connection_reconnects_and_resyncs(system):
    before = counter("reconnects", exchange="kraken")
    await system.sim.drop_clients("kraken", rest=False)
    await aio(wait_until(lambda: counter("reconnects", exchange="kraken") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_stalled_connection_is_detected_and_replaced(system):
    before = counter("reconnects", exchange="kraken")
    assert system.sim.stall("kraken") >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="kraken") > before, timeout=5))
    system.sim.unstall()
    await aio(system.settle())
    system.assert_streams_intact()


@pytest.mark.parametrize("code, reason", [(1000, ""), (1001, "Going away")])
@pytest_twisted.ensureDeferred
async def test_closing_the_connection_is_recovered(system, code, reason):
    before = counter("reconnects", exchange="kraken")
    assert system.sim.close_clients("kraken", code, reason) >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="kraken") > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_rotation_hands_over_without_withdrawing_the_books(system):
    feed = system.kraken
    book = feed.books["btcusd"]
    states = []
    original = book._set_state
    book._set_state = lambda state, reason: (states.append(state), original(state, reason))
    first = feed.connections[0]
    feed.rotate(first, "test: rotation")
    await aio(wait_until(lambda: feed.connections[0] is not first, timeout=5))
    await aio(system.settle())
    assert states == []
    system.assert_streams_intact()
