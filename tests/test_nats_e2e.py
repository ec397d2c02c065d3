"""Simulator → ingest daemons → a real nats-server → edges → gRPC clients, on loopback."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import Watcher, as_tuples, expected_from_simulator
from tests.nats_e2e import grpc_port, start_nats_daemon
from tests.natsserver import NatsServer


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


def exact(sim, watcher, symbols):
    return all(
        s in watcher.latest and as_tuples(watcher.latest[s]) == expected_from_simulator(sim, s)
        for s in symbols
    )


@pytest_twisted.ensureDeferred
async def test_one_daemon_in_both_roles_serves_exact_books_through_nats(nats_server):
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=7, speed=5.0, loop=False)
    sim.startService()
    daemon = await start_nats_daemon(sim, nats_server.url, "both")
    symbols = ["ethbtc", "btcusdt"]
    watcher = Watcher(grpc_port(daemon), symbols)
    try:
        await aio(wait_until(lambda: sim.finished and exact(sim, watcher, symbols), timeout=30))
        assert watcher.errors == []
    finally:
        await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()
