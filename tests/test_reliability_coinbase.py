"""Coinbase's faults end to end: simulator → daemon (twistd plugin) → gRPC
streams on loopback. Each test ends with every stream showing the
simulator's true merged books exactly, no client stream broken, and the
counter that says what happened moved."""

import pytest
import pytest_twisted
from prometheus_client import REGISTRY

from aggregator._proto import orderbook_pb2
from aggregator.book import BookState
from tests.aio import aio, wait_until
from tests.reliability import counter, running_system, speed_up

SYMBOLS = ["btcusd", "ethbtc"]


def total_rejects():
    return sum(s.value for m in REGISTRY.collect() if m.name == "aggregator_rejects"
               for s in m.samples if s.name.endswith("_total") and s.labels["exchange"] == "coinbase")


def fast(daemon):
    speed_up(daemon, ("binance", "bitstamp"), handover_overlap=0.3)
    speed_up(daemon, ("coinbase",), handover_overlap=0.3, inactivity_timeout=2.0)
    daemon.getServiceNamed("coinbase").adapter.heartbeat_timeout = 1.5


def watch_states(system, symbol):
    """The states the daemon's coinbase book of `symbol` goes through from now."""
    book = system.feed("coinbase").books[symbol]
    states = []
    original = book._set_state
    book._set_state = lambda state, reason: (states.append(state), original(state, reason))
    return states


@pytest.fixture
def system():
    yield from running_system(SYMBOLS, fast, seed=7)


@pytest_twisted.ensureDeferred
async def test_books_from_every_venue_merge_exactly(system):
    # settle() waited for exact books; every venue listing btcusd is live in them
    # (whose levels make the top 10 depends on the prices).
    summary = system.watcher.latest["btcusd"]
    states = {state.exchange: state.state for state in summary.exchanges}
    assert {"bitstamp", "coinbase", "kraken"} <= set(states)
    assert set(states.values()) == {orderbook_pb2.ExchangeState.LIVE}
    system.assert_streams_intact()


@pytest.mark.parametrize("fault", ["skip_updates", "lose_next_update"])
@pytest_twisted.ensureDeferred
async def test_sequence_gap_reconnects_and_resyncs_every_book_of_the_connection(system, fault):
    resyncs = counter("resyncs", exchange="coinbase", reason="gap")
    reconnects = counter("reconnects", exchange="coinbase")
    if fault == "skip_updates":
        system.sim.skip_updates("coinbase", "ethbtc", 3)
    else:
        system.sim.lose_next_update("coinbase", "ethbtc")
    # Both books share the connection: both resync, though only ethbtc had the gap.
    await aio(wait_until(lambda: counter("resyncs", exchange="coinbase", reason="gap") >= resyncs + 2))
    await aio(wait_until(lambda: counter("reconnects", exchange="coinbase") > reconnects))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_missing_heartbeats_replace_the_connection_make_before_break(system):
    states = watch_states(system, "btcusd")
    first = system.feed("coinbase").connections[0]
    reconnects = counter("reconnects", exchange="coinbase")
    assert system.venue('coinbase').silence_heartbeats() >= 1
    await aio(wait_until(lambda: system.feed("coinbase").connections[0] is not first, timeout=8))
    assert counter("reconnects", exchange="coinbase") > reconnects
    await aio(system.settle())
    # Its messages were all in sequence: the book stayed live, handed over,
    # at most withdrawn between the handover and the successor's snapshot.
    assert BookState.STALE not in states
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_silent_close_reconnects_and_resyncs(system):
    reconnects = counter("reconnects", exchange="coinbase")
    assert system.venue('coinbase').close_silently() >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="coinbase") > reconnects))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_dropped_connection_reconnects_and_resyncs(system):
    reconnects = counter("reconnects", exchange="coinbase")
    await system.sim.drop_clients("coinbase", rest=False)
    await aio(wait_until(lambda: counter("reconnects", exchange="coinbase") > reconnects))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_stalled_connection_is_detected_and_replaced(system):
    reconnects = counter("reconnects", exchange="coinbase")
    assert system.sim.stall("coinbase") >= 1
    await aio(wait_until(lambda: counter("reconnects", exchange="coinbase") > reconnects, timeout=6))
    system.sim.unstall()
    await aio(system.settle())
    system.assert_streams_intact()


@pytest.mark.parametrize("kind", ["nan_price", "inf_price", "zero_price", "negative_amount"])
@pytest_twisted.ensureDeferred
async def test_bad_numbers_resync_that_book_alone(system, kind):
    rejects = total_rejects()
    resyncs = counter("resyncs", exchange="coinbase", reason="bad_data")
    reconnects = counter("reconnects", exchange="coinbase")
    assert system.sim.send_bad_frame("coinbase", "ethbtc", kind) >= 1
    await aio(wait_until(lambda: total_rejects() > rejects))
    await aio(system.settle())
    assert counter("resyncs", exchange="coinbase", reason="bad_data") == resyncs + 1
    assert counter("reconnects", exchange="coinbase") == reconnects  # resubscribed, not reconnected
    system.assert_streams_intact()


@pytest.mark.parametrize("kind", ["malformed_json", "wrong_types"])
@pytest_twisted.ensureDeferred
async def test_unreadable_frames_resync_the_connection(system, kind):
    rejects = total_rejects()
    reconnects = counter("reconnects", exchange="coinbase")
    assert system.sim.send_bad_frame("coinbase", "ethbtc", kind) >= 1
    await aio(wait_until(lambda: total_rejects() > rejects))
    await aio(wait_until(lambda: counter("reconnects", exchange="coinbase") > reconnects))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_unknown_channel_is_ignored(system):
    states = watch_states(system, "ethbtc")
    rejects = total_rejects()
    assert system.sim.send_bad_frame("coinbase", "ethbtc", "unknown_event") >= 1
    await aio(system.settle())
    assert states == [] and total_rejects() == rejects
    system.assert_streams_intact()
