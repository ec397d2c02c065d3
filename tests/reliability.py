"""The running system the reliability suites drive: simulator → daemon (built by
the twistd plugin, backoff and timeouts shortened) → gRPC streams on loopback,
and what every fault test asserts at its end."""

from __future__ import annotations

import dataclasses

import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from aggregator.book import BookState
from aggregator.simulator import SimulatorService
from aggregator.simulator.venues import EXCHANGES
from tests.aio import aio, wait_until
from tests.e2e import Watcher, as_tuples, expected_from_simulator, start_daemon


def counter(name, **labels):
    return REGISTRY.get_sample_value(f"aggregator_{name}_total", labels) or 0.0


def speed_up(daemon, venues=EXCHANGES, **settings):
    """Backoff of 50 ms, 100 ms, ...; the venues' settings replaced by `settings`."""
    for name in venues:
        feed = daemon.getServiceNamed(name)
        feed.retry_policy = lambda attempt: 0.05 * (attempt + 1)
        feed.settings = dataclasses.replace(feed.settings, **settings)


class System:
    def __init__(self, sim, daemon, watcher, symbols):
        self.sim, self.daemon, self.watcher, self.symbols = sim, daemon, watcher, symbols

    def feed(self, exchange):
        return self.daemon.getServiceNamed(exchange)

    def venue(self, exchange):
        """The simulator's side of `exchange` (its venue-specific faults)."""
        return self.sim._venues[exchange]

    def all_live(self):
        """Every venue's book of every watched symbol it lists is live."""
        return all(
            (book := self.feed(name).books.get(symbol)) is not None and book.state is BookState.LIVE
            for name in EXCHANGES for symbol in self.symbols if symbol in self.sim.symbols(name))

    def exact(self):
        return all(
            symbol in self.watcher.latest
            and as_tuples(self.watcher.latest[symbol]) == expected_from_simulator(self.sim, symbol)
            for symbol in self.symbols)

    async def settle(self, timeout=10.0):
        """Stop the market, then wait until every stream shows the true books."""
        await wait_until(self.all_live, timeout)
        self.sim.pause()
        await wait_until(self.exact, timeout)
        self.sim.resume()

    def assert_streams_intact(self):
        assert self.watcher.errors == []
        assert not any(call.done() for call in self.watcher.calls.values())

    def assert_rest_within_budget(self, forced=(), exchanges=("binance", "bitstamp")):
        """No 418/429 but the ones a test forced, as (exchange, status)."""
        for exchange in exchanges:
            refused = [r for r in self.sim.rest_log(exchange) if r.status in (418, 429)]
            assert [r.status for r in refused] == [s for e, s in forced if e == exchange]


def running_system(symbols, configure, seed=7, speed=2.0):
    """A pytest fixture body: a settled System, stopped afterwards."""
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=seed, speed=speed)
    sim.startService()
    daemon = pytest_twisted.blockon(ensureDeferred(start_daemon(sim, configure=configure)))
    watcher = Watcher(daemon.getServiceNamed("grpc").port, symbols)
    system = System(sim, daemon, watcher, symbols)
    pytest_twisted.blockon(aio(system.settle()))
    yield system
    pytest_twisted.blockon(aio(watcher.close()))
    pytest_twisted.blockon(daemon.stopService())
    pytest_twisted.blockon(sim.stopService())
