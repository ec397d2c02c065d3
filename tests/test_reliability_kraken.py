"""Kraken's faults end to end: simulator → daemon (twistd plugin) → gRPC streams.

Each test injects one fault into the running system and asserts that, after
recovery, the merged books equal the simulator's true books exactly (every
venue listing the symbol merged), that no client stream broke, and that the
right counter moved. Kraken has no sequence numbers: a lost update and a
wrong checksum are both found by the checksum, and healed by a new
subscription (unsubscribe + subscribe → a fresh snapshot).
"""

import pytest
import pytest_twisted
from prometheus_client import REGISTRY

from tests.aio import aio, wait_until
from tests.reliability import counter, running_system, speed_up

SYMBOLS = ["btcusd", "ethbtc"]


def fast(daemon):
    speed_up(daemon, ("binance", "bitstamp", "kraken"), inactivity_timeout=1.0, handover_overlap=0.3)


@pytest.fixture
def system():
    yield from running_system(SYMBOLS, fast, seed=7)


def test_kraken_books_are_merged_with_the_others(system):
    # The fixture settled: the merge includes Kraken's book, exactly.
    assert "kraken" in {level.exchange for level in system.watcher.latest["btcusd"].bids}
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_wrong_checksum_resyncs_that_symbol(system):
    before = counter("resyncs", exchange="kraken", reason="checksum")
    system.venue('kraken').corrupt_next_checksum("btcusd")
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
    feed = system.feed("kraken")
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
