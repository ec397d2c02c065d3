"""Record the demo with --record, replay it with --demo-source replay:DIR, twice:
the same Summaries every time (issue 11, section 1)."""

import asyncio

import pytest_twisted

from aggregator._proto import orderbook_pb2
from aggregator.exchanges import VENUES
from aggregator.simulator import cli
from aggregator.simulator.replay import load_recording
from tests.aio import aio, wait_until
from tests.e2e import plugin, start_daemon

# Kraken sends its snapshots over the websocket: one connection carries
# everything a book is made of, so the replay is deterministic (replay.py).
VENUE = "kraken"
SYMBOL = "ethbtc"
RECORD_SECONDS = 10.0
# Never a live venue: the demo replaces these with its own loopback URLs.
PLACEHOLDER_URLS = [
    arg for name in VENUES for kind, scheme in (("ws", "ws"), ("rest", "http"))
    for arg in (f"--{name}-{kind}-url", f"{scheme}://127.0.0.1:9")
]


class Collector:
    """Every Summary the merger publishes for SYMBOL, none conflated: each
    delivery asks for the next one before the merger can publish again."""

    def __init__(self, merger, symbol=SYMBOL):
        self.summaries = []
        self.subscription = merger.subscribe(symbol)
        self._next()

    def _next(self):
        self.subscription.next().addCallback(self._got)

    def _got(self, summary):
        if summary is None:
            return
        decoded = orderbook_pb2.Summary.FromString(summary)
        decoded.ClearField("timestamp_us")  # when it was made: differs from run to run
        self.summaries.append(decoded.SerializeToString(deterministic=True))
        self._next()

    def close(self):
        self.subscription.close()


async def run_daemon(*args, until):
    options = plugin().options()
    options.parseOptions([
        "--listen", "127.0.0.1:0", "--exchanges", VENUE, "--symbols", SYMBOL, "--demo",
        # Every book state, not one per reactor turn: comparable across runs
        # (--demo-source replay:DIR implies it).
        "--merge-every-frame", *PLACEHOLDER_URLS, *args,
    ])
    daemon = plugin().makeService(options)
    daemon.startService()
    merger = daemon.getServiceNamed("merger")
    # Before any book frame: the book needs a websocket round trip after the list.
    await merger.when_symbol_lists_loaded()
    collector = Collector(merger)
    try:
        await until(daemon)
    finally:
        collector.close()
        await daemon.stopService()
    return collector.summaries


async def run_fast(directory):
    options = cli.Options()
    options.parseOptions(["--replay", directory, "--speed", "0"])
    sim = cli.make_service(options)
    sim.startService()
    daemon = await start_daemon(sim, "--exchanges", VENUE, "--symbols", SYMBOL, "--merge-every-frame")
    merger = daemon.getServiceNamed("merger")
    try:
        await merger.when_symbol_lists_loaded()
        collector = Collector(merger)
        await aio(wait_until(lambda: sim.finished, timeout=20))
        await aio(asyncio.sleep(0.3))  # the last frames reach the merger
        collector.close()
    finally:
        await daemon.stopService()
        await sim.stopService()
    return collector.summaries


async def replayed_to_the_end(daemon):
    replay = daemon.getServiceNamed("simulator")
    await aio(wait_until(lambda: replay.finished, timeout=20))
    await aio(asyncio.sleep(0.3))  # the last frames reach the merger


@pytest_twisted.ensureDeferred
async def test_a_recorded_demo_replays_to_the_same_summaries_twice(tmp_path):
    directory = str(tmp_path / "rec")
    live = await run_daemon(
        "--record", directory, until=lambda _: aio(asyncio.sleep(RECORD_SECONDS)))
    recording = load_recording(directory)
    (connection,) = recording.connections[VENUE]
    kinds = {frame.kind for frame in connection.frames}
    assert kinds == {"in", "out"}  # the daemon's subscribe, the venue's frames
    assert recording.rest[VENUE]  # the symbol list
    assert len(live) > 20, "too few changes recorded to compare anything"

    first = await run_daemon(
        "--demo-source", f"replay:{directory}", "--demo-speed", "100", until=replayed_to_the_end)
    second = await run_daemon(
        "--demo-source", f"replay:{directory}", "--demo-speed", "100", until=replayed_to_the_end)

    assert first == second
    # As fast as the client reads, from aggregator-sim: the same again.
    fastest = await run_fast(directory)
    assert fastest == first
    # The recorder stops with the feeds, so the replay may hold a few frames
    # more than the live run saw before it stopped collecting.
    assert first[: len(live)] == live
    assert len(first) - len(live) < 5


def last_summary(summaries):
    return orderbook_pb2.Summary.FromString(summaries[-1])


@pytest_twisted.ensureDeferred
async def test_the_recorded_fixtures_go_through_record_and_aggregator_sim_replay(tmp_path):
    """The cryptofeed fixtures (the `recorded` source) recorded by the daemon, then
    served by `aggregator-sim --replay DIR --speed 0`: the books end where they ended
    live. Binance and Bitstamp books also need REST snapshots, so only the end state
    is compared (the order between connections is scheduling's, replay.py)."""
    directory = str(tmp_path / "rec")
    symbols = ["nknusdt", "ethusd"]
    options = plugin().options()
    options.parseOptions([
        "--listen", "127.0.0.1:0", "--exchanges", "binance,bitstamp", "--symbols", ",".join(symbols),
        "--demo", "--demo-source", "recorded", "--demo-speed", "5", *PLACEHOLDER_URLS,
        "--record", directory,
    ])
    daemon = plugin().makeService(options)
    daemon.startService()
    merger = daemon.getServiceNamed("merger")
    await merger.when_symbol_lists_loaded()
    live = {symbol: Collector(merger, symbol) for symbol in symbols}
    try:
        await aio(wait_until(lambda: all(len(c.summaries) > 5 for c in live.values()), timeout=15))
        await aio(asyncio.sleep(1.0))
        assert all(last_summary(c.summaries).bids for c in live.values())
    finally:
        for collector in live.values():
            collector.close()
        await daemon.stopService()

    sim_options = cli.Options()
    sim_options.parseOptions(["--replay", directory, "--speed", "0"])
    sim = cli.make_service(sim_options)
    sim.startService()
    daemon = await start_daemon(sim, "--exchanges", "binance,bitstamp", "--symbols", ",".join(symbols))
    merger = daemon.getServiceNamed("merger")
    try:
        await merger.when_symbol_lists_loaded()
        replayed = {symbol: Collector(merger, symbol) for symbol in symbols}

        def caught_up():
            return sim.finished and all(
                replayed[s].summaries and last_summary(replayed[s].summaries).bids
                == last_summary(live[s].summaries).bids
                and last_summary(replayed[s].summaries).asks == last_summary(live[s].summaries).asks
                for s in symbols)

        await aio(wait_until(caught_up, timeout=15))
    finally:
        for collector in replayed.values():
            collector.close()
        await daemon.stopService()
        await sim.stopService()
