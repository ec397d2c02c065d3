"""The issue's end-to-end scenario: simulator → two ingest daemons (real
processes) → a real nats-server → two edges → gRPC clients.

Every client's book ends equal to the simulator's truth; killing the ingest
daemon that owns a symbol moves it to the other within the lease and the
clients' streams stay open and end exact; stopping an edge leaves the other
edge's clients alone; once leases settle no symbol is ingested twice.
"""

import asyncio
import time

import nats
import pytest
import pytest_twisted
from twisted.internet import reactor

from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import Watcher, as_tuples, expected_from_simulator
from tests.nats_e2e import IngestProcess, grpc_port, ingest_subscriptions, start_nats_daemon
from tests.natsserver import NatsServer

LEASE = 1.0
SYMBOLS_A = ["ethbtc", "btcusdt", "ethusdt"]
SYMBOLS_B = ["ethbtc", "ltcbtc", "btceur"]
ALL = sorted(set(SYMBOLS_A) | set(SYMBOLS_B))


def exact(sim, watcher, symbols):
    return all(
        s in watcher.latest and as_tuples(watcher.latest[s]) == expected_from_simulator(sim, s)
        for s in symbols
    )


def ingested_once(sim):
    return all(ingest_subscriptions(sim, s) == {"binance": 1, "bitstamp": 1} for s in ALL)


async def settle_exact(sim, watchers, timeout=30.0):
    """Pause the market, then every client's book must reach the truth."""
    sim.pause()
    await wait_until(
        lambda: all(exact(sim, w, symbols) for w, symbols in watchers), timeout=timeout
    )


async def lease_owner(kv, symbol):
    try:
        return (await kv.get(symbol)).value.decode()
    except nats.js.errors.KeyNotFoundError:
        return None


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_two_ingests_two_edges_exact_through_takeover_and_edge_loss(nats_server, tmp_path):
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=3, speed=2.0)
    sim.startService()
    ingests = [IngestProcess(sim, nats_server.url, tmp_path / f"ingest{i}.log", lease=LEASE)
               for i in range(2)]
    edges, watchers = [], []
    client = None
    try:
        edges = [await start_nats_daemon(None, nats_server.url, "edge", lease=LEASE)
                 for _ in range(2)]
        for edge in edges:
            await aio(asyncio_timeout(edge.getServiceNamed("edge").when_symbols_loaded(), 30))
        watchers = [Watcher(grpc_port(edges[0]), SYMBOLS_A), Watcher(grpc_port(edges[1]), SYMBOLS_B)]
        pairs = list(zip(watchers, (SYMBOLS_A, SYMBOLS_B)))

        async def scenario():
            nonlocal client
            await settle_exact(sim, pairs)
            # Leases settled: each symbol is watched by exactly one ingest daemon.
            await wait_until(lambda: ingested_once(sim), timeout=5)
            client = await nats.connect(nats_server.url)
            kv = await client.jetstream().key_value("aggregator_leases")
            owners = {s: await lease_owner(kv, s) for s in ALL}
            pids = {str(i.pid): i for i in ingests}
            assert all(o is not None and o.split("-")[-2] in pids for o in owners.values()), owners

            # Kill (SIGKILL) the owner of ethbtc mid-run: no lease is handed back.
            sim.resume()
            await asyncio.sleep(1.0)
            victim = pids[owners["ethbtc"].split("-")[-2]]
            survivor = next(i for i in ingests if i is not victim)
            killed_at = time.monotonic()
            victim.kill()
            taken_over = {}

            async def all_moved():
                for s in ALL:
                    if s not in taken_over:
                        owner = await lease_owner(kv, s)
                        if owner is not None and owner.split("-")[-2] == str(survivor.pid):
                            taken_over[s] = time.monotonic() - killed_at
                return len(taken_over) == len(ALL)

            deadline = time.monotonic() + 4 * LEASE + 5
            while not await all_moved():
                assert time.monotonic() < deadline, f"not taken over: {taken_over}"
                await asyncio.sleep(0.05)
            # Nominally expiry (at most a lease after the kill) + one claim pass (a
            # quarter lease); the slack is for a loaded test machine.
            assert max(taken_over.values()) < 3 * LEASE + 1.0, taken_over
            await settle_exact(sim, pairs)
            await wait_until(lambda: ingested_once(sim), timeout=5)
            assert [w.errors for w in watchers] == [[], []]

            # Stop edge 0: edge 1's clients go on, exact, unbroken.
            sim.resume()
            await watchers[0].close()
            await edges[0].stopService().asFuture(asyncio.get_running_loop())
            before = dict(watchers[1].counts)
            await wait_until(
                lambda: all(watchers[1].counts[s] > before[s] for s in SYMBOLS_B), timeout=10)
            await settle_exact(sim, pairs[1:])
            assert watchers[1].errors == []
            # Edge 0's demand went with it: symbols only it wanted are let go of.
            only_0 = sorted(set(SYMBOLS_A) - set(SYMBOLS_B))
            await wait_until(lambda: all(
                ingest_subscriptions(sim, s) == {"binance": 0, "bitstamp": 0} for s in only_0),
                timeout=3 * LEASE + 2)
            assert all(ingest_subscriptions(sim, s) == {"binance": 1, "bitstamp": 1}
                       for s in SYMBOLS_B)
            return max(taken_over.values())

        takeover = await aio(scenario())
        print(f"takeover within {takeover:.2f}s of the kill (lease {LEASE}s)")
    finally:
        for watcher in watchers:
            await aio(watcher.close())
        if client is not None:
            await aio(client.close())
        for edge in edges:
            if edge.running:
                await edge.stopService()
        for ingest in ingests:
            ingest.stop()
        await sim.stopService()


def asyncio_timeout(deferred, seconds):
    return asyncio.wait_for(deferred.asFuture(asyncio.get_event_loop()), seconds)
