"""Leases and demand: the local key view's expiry, --max-symbols and --symbols
on ingest daemons, and demand withdrawn when clients leave."""

import asyncio

import nats
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from aggregator.nats.keys import KeyView
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import Watcher
from tests.nats_e2e import grpc_port, ingest_subscriptions, start_nats_daemon
from tests.natsserver import NatsServer


def test_key_view_expires_keys_not_rewritten_within_the_ttl_and_forgets_deleted_ones():
    clock = Clock()
    view = KeyView(ttl=1.0, clock=clock)
    written = []
    view.add_listener(written.append)
    view.seed([("ethbtc", b"a")])
    view.written("btcusdt", b"b", None)
    clock.advance(0.6)
    view.written("btcusdt", b"b2", None)  # renewed
    clock.advance(0.6)
    assert view.get("ethbtc") is None and view.get("btcusdt") == b"b2"
    view.written("btcusdt", b"", "DEL")
    assert view.keys() == [] and written == ["btcusdt", "btcusdt"]


@pytest_twisted.ensureDeferred
async def test_max_symbols_caps_claims_pinned_symbols_are_claimed_and_demand_follows_clients(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=5, speed=1.0)
    sim.startService()
    capped = await start_nats_daemon(sim, server.url, "ingest", "--max-symbols", "1",
                                     "--symbols", "ltcbtc")
    daemons = [capped]
    watcher = None
    try:
        capped_ingest = capped.getServiceNamed("ingest")
        # Pinned: claimed with no client anywhere.
        await aio(wait_until(lambda: set(capped_ingest.owned) == {"ltcbtc"}, timeout=10))
        other = await start_nats_daemon(sim, server.url, "ingest")
        daemons.append(other)
        edge = await start_nats_daemon(None, server.url, "edge")
        daemons.append(edge)
        other_ingest = other.getServiceNamed("ingest")

        async def scenario():
            nonlocal watcher
            await edge.getServiceNamed("edge").when_symbols_loaded().asFuture(
                asyncio.get_running_loop())
            symbols = ["ethbtc", "btcusdt", "ethusdt"]
            watcher = Watcher(grpc_port(edge), symbols)
            # The capped daemon is full: the other one takes every new symbol.
            await wait_until(lambda: set(other_ingest.owned) == set(symbols), timeout=10)
            assert set(capped_ingest.owned) == {"ltcbtc"}
            await wait_until(lambda: all(
                ingest_subscriptions(sim, s) == {"binance": 1, "bitstamp": 1}
                for s in [*symbols, "ltcbtc"]), timeout=10)
            # Clients leave: demand is withdrawn, the owner lets go and unsubscribes.
            await watcher.close()
            watcher = None
            await wait_until(lambda: not other_ingest.owned, timeout=5)
            await wait_until(lambda: all(
                ingest_subscriptions(sim, s) == {"binance": 0, "bitstamp": 0} for s in symbols),
                timeout=5)
            assert set(capped_ingest.owned) == {"ltcbtc"}

        await aio(scenario())
        # A clean stop hands the lease back at once instead of letting it expire.
        await capped.stopService()
        daemons.remove(capped)

        async def lease_gone():
            client = await nats.connect(server.url)
            try:
                kv = await client.jetstream().key_value("aggregator_leases")
                with pytest.raises(nats.js.errors.NotFoundError):  # deleted, or never there
                    await kv.get("ltcbtc")
            finally:
                await client.close()

        await aio(lease_gone())
    finally:
        if watcher is not None:
            await aio(watcher.close())
        for daemon in reversed(daemons):
            await daemon.stopService()
        await sim.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_edge_stops_holding_its_symbols_within_the_lease(tmp_path):
    from tests.nats_e2e import DaemonProcess
    from tests.natsserver import free_port

    server = NatsServer(tmp_path)
    server.start()
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=8, speed=1.0)
    sim.startService()
    ingest = await start_nats_daemon(sim, server.url, "ingest")
    port = free_port()
    edge = DaemonProcess("edge", None, server.url, tmp_path / "edge.log", listen=f"127.0.0.1:{port}")
    watcher = None
    try:
        async def scenario():
            nonlocal watcher
            await wait_until(lambda: sim.connections("binance") > 0, timeout=10)
            owned = ingest.getServiceNamed("ingest").owned
            for _ in range(100):  # the edge process starts, then its catalog arrives
                watcher = Watcher(port, ["ethbtc"])
                await asyncio.sleep(0.3)
                if watcher.counts["ethbtc"] and not watcher.errors:
                    break
                await watcher.close()
                watcher = None
            assert watcher is not None, "edge never served"
            await wait_until(lambda: "ethbtc" in owned, timeout=5)
            edge.kill()  # its demand key is left to expire
            await watcher.close()
            watcher = None
            await wait_until(lambda: "ethbtc" not in owned, timeout=4)
            await wait_until(
                lambda: ingest_subscriptions(sim, "ethbtc") == {"binance": 0, "bitstamp": 0},
                timeout=3)

        await aio(scenario())
    finally:
        if watcher is not None:
            await aio(watcher.close())
        edge.stop()
        await ingest.stopService()
        await sim.stopService()
        server.stop()
