"""Every fault of the Bybit simulator, end to end: simulator → daemon (built by the twistd
plugin) → real gRPC streams on loopback.

Each test injects one fault into a running system and asserts that, after recovery, the
merged books equal the simulator's true books exactly (every venue's), that no client stream
broke, and that the right counter moved. Backoff and timeouts are shortened so recovery takes
a fraction of a second.
"""

import pytest
import pytest_twisted
from prometheus_client import REGISTRY

from aggregator.book import BookState
from tests.aio import aio, wait_until
from tests.reliability import counter, running_system, speed_up

# btcusdt: Binance and Bybit; ethbtc: every venue; ethusdt: Binance and Bybit.
SYMBOLS = ["btcusdt", "ethbtc", "ethusdt"]


def fast(daemon):
    speed_up(daemon, inactivity_timeout=1.0, handover_overlap=0.3, reply_timeout=2.0)


@pytest.fixture
def system():
    yield from running_system(SYMBOLS, fast, seed=7)


async def moved(name, **labels):
    before = counter(name, **labels)
    return lambda: counter(name, **labels) > before


@pytest_twisted.ensureDeferred
async def test_bybit_books_are_exact_and_every_topic_has_ten_args_at_most(system):
    # The fixture settled: Bybit's books are part of the exact merge.
    assert system.feed("bybit").books["btcusdt"].state is BookState.LIVE
    assert system.sim.violations == []
    system.assert_streams_intact()


@pytest.mark.parametrize("fault", ["skip_updates", "lose_next_update"])
@pytest_twisted.ensureDeferred
async def test_a_lost_update_id_resubscribes_that_symbol(system, fault):
    gap = await moved("resyncs", exchange="bybit", reason="gap")
    other = system.feed("bybit").books["ethbtc"]
    states = []
    original = other._set_state
    other._set_state = lambda state, reason: (states.append(state), original(state, reason))
    if fault == "skip_updates":
        assert system.sim.skip_updates("bybit", "btcusdt", 3) is not None
    else:
        system.sim.lose_next_update("bybit", "btcusdt")
    await aio(wait_until(gap))
    await aio(system.settle())
    assert states == []  # only the symbol with the gap resynced
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_a_snapshot_mid_stream_replaces_the_book(system):
    reset = await moved("book_resets", exchange="bybit", reason="snapshot")
    gaps = counter("resyncs", exchange="bybit", reason="gap")
    assert system.sim._venue("bybit").send_snapshot("btcusdt") == 1
    await aio(wait_until(reset))
    await aio(system.settle())
    assert counter("resyncs", exchange="bybit", reason="gap") == gaps  # no resync needed
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_a_service_restart_with_u_1_overwrites_every_book(system):
    before = counter("book_resets", exchange="bybit", reason="restart")
    gaps = counter("resyncs", exchange="bybit", reason="gap")
    assert system.sim._venue("bybit").restart() == len(SYMBOLS)
    await aio(wait_until(lambda: counter("book_resets", exchange="bybit", reason="restart")
                         >= before + len(SYMBOLS)))
    await aio(system.settle())
    # The deltas after the restart (u = 2, 3, ...) continue the new sequence.
    assert counter("resyncs", exchange="bybit", reason="gap") == gaps
    system.assert_streams_intact()


@pytest.mark.parametrize("kind", ["malformed_json", "nan_price", "inf_price", "zero_price",
                                  "negative_amount", "wrong_types"])
@pytest_twisted.ensureDeferred
async def test_bad_frames_are_rejected_counted_and_healed(system, kind):
    def total_rejects():
        return sum(s.value for m in REGISTRY.collect() if m.name == "aggregator_rejects"
                   for s in m.samples if s.name.endswith("_total") and s.labels["exchange"] == "bybit")
    before = total_rejects()
    assert system.sim.send_bad_frame("bybit", "ethbtc", kind) == 1
    await aio(wait_until(lambda: total_rejects() > before))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_an_unknown_message_type_is_rejected_without_a_resync(system):
    rejected = await moved("rejects", exchange="bybit", reason="unexpected")
    resyncs = counter("resyncs", exchange="bybit", reason="bad_data")
    assert system.sim.send_bad_frame("bybit", "ethbtc", "unknown_event") == 1
    await aio(wait_until(rejected))
    await aio(system.settle())
    assert counter("resyncs", exchange="bybit", reason="bad_data") == resyncs
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_dropped_connection_reconnects_and_resubscribes(system):
    reconnected = await moved("reconnects", exchange="bybit")
    await system.sim.drop_clients("bybit", rest=False)
    await aio(wait_until(reconnected))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_closed_connection_reconnects(system):
    reconnected = await moved("reconnects", exchange="bybit")
    assert system.sim.close_clients("bybit", 1001, "server shutdown") >= 1
    await aio(wait_until(reconnected))
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_stalled_connection_is_detected_and_replaced(system):
    reconnected = await moved("reconnects", exchange="bybit")
    assert system.sim.stall("bybit") >= 1
    await aio(wait_until(reconnected, timeout=5))
    system.sim.unstall()
    await aio(system.settle())
    system.assert_streams_intact()


@pytest_twisted.ensureDeferred
async def test_rotation_hands_over_without_withdrawing_books(system):
    feed = system.feed("bybit")
    book = feed.books["btcusdt"]
    states = []
    original = book._set_state
    book._set_state = lambda state, reason: (states.append(state), original(state, reason))
    first = feed.connections[0]
    feed.rotate(first, "test: rotation")
    await aio(wait_until(lambda: feed.connections[0] is not first, timeout=5))
    await aio(system.settle())
    assert states == []  # never withdrawn: no gap for clients
    system.assert_streams_intact()
