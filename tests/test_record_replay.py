"""Record the demo with --record, replay it with --demo-source replay:DIR, twice:
the same Summaries every time (issue 11, section 1)."""

import asyncio

import pytest_twisted

from aggregator._proto import orderbook_pb2
from aggregator.exchanges import VENUES
from aggregator.simulator.replay import load_recording
from tests.aio import aio, wait_until
from tests.e2e import plugin

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

    def __init__(self, merger):
        self.summaries = []
        self.subscription = merger.subscribe(SYMBOL)
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
        *PLACEHOLDER_URLS, *args,
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
    assert len(recording.connections[VENUE]) == 1
    assert len(live) > 20, "too few changes recorded to compare anything"

    first = await run_daemon(
        "--demo-source", f"replay:{directory}", "--demo-speed", "100", until=replayed_to_the_end)
    second = await run_daemon(
        "--demo-source", f"replay:{directory}", "--demo-speed", "100", until=replayed_to_the_end)

    assert first == second
    # The recorder stops with the feeds, so the replay may hold a few frames
    # more than the live run saw before it stopped collecting.
    assert first[: len(live)] == live
    assert len(first) - len(live) < 5
