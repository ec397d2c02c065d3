"""NATS faults with a real nats-server: unreachable at start-up, a restart
(clients see the venues STALE, never a frozen live book, then exact again),
and garbage on a Summary subject (dropped, counted, never forwarded)."""

import asyncio

import grpc
import pytest
import nats
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from aggregator._proto import orderbook_pb2
from aggregator.grpc_service import SERVICE_NAME
from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until, within
from tests.e2e import Watcher, as_tuples, expected_from_simulator
from tests.nats_e2e import grpc_port, start_nats_daemon
from tests.natsserver import NatsServer, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STALE = orderbook_pb2.ExchangeState.STALE


async def health(port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return (await within(stub.Check(request), 5)).status


def exact(sim, watcher, symbol):
    latest = watcher.latest.get(symbol)
    return latest is not None and as_tuples(latest) == expected_from_simulator(sim, symbol)


@pytest_twisted.ensureDeferred
async def test_unreachable_nats_at_start_is_not_fatal_logged_once_and_not_serving_until_up(tmp_path):
    server = NatsServer(tmp_path, port=free_port())  # not started yet
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    events = []

    def observe(event):
        if str(event.get("log_format", "")).startswith("NATS: ") and event.get("log_level").name == "warn":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    daemon = await start_nats_daemon(sim, server.url, "both")
    watcher = None
    try:
        async def scenario():
            nonlocal watcher
            await asyncio.sleep(2.5)  # a few connection attempts (one a second)
            assert await health(grpc_port(daemon)) == NOT_SERVING
            assert len(events) == 1, [e["log_format"] for e in events]  # once per burst
            server.start()
            await wait_until(lambda: daemon.getServiceNamed("bus").connected, timeout=10)
            loop = asyncio.get_running_loop()
            await daemon.getServiceNamed("edge").when_symbols_loaded().asFuture(loop)
            assert await health(grpc_port(daemon)) == SERVING
            watcher = Watcher(grpc_port(daemon), ["ethbtc"])
            sim.pause()
            await wait_until(lambda: exact(sim, watcher, "ethbtc"), timeout=15)

        await aio(scenario())
    finally:
        globalLogPublisher.removeObserver(observe)
        if watcher is not None:
            await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_nats_restart_shows_stale_venues_then_resumes_exact(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=2, speed=2.0)
    sim.startService()
    daemon = await start_nats_daemon(sim, server.url, "both")
    watcher = None
    try:
        async def scenario():
            nonlocal watcher
            loop = asyncio.get_running_loop()
            await daemon.getServiceNamed("edge").when_symbols_loaded().asFuture(loop)
            watcher = Watcher(grpc_port(daemon), ["ethbtc"])
            await wait_until(lambda: exact(sim, watcher, "ethbtc") and
                             watcher.latest["ethbtc"].bids, timeout=15)
            server.stop()

            def stale():
                summary = watcher.latest["ethbtc"]
                return (not summary.bids and not summary.asks and
                        {"binance", "bitstamp"} <= {e.exchange for e in summary.exchanges} and
                        all(e.state == STALE for e in summary.exchanges))
            await wait_until(stale, timeout=10)
            server.start()
            sim.pause()
            await wait_until(lambda: exact(sim, watcher, "ethbtc") and
                             watcher.latest["ethbtc"].bids, timeout=20)
            assert watcher.errors == []

        await aio(scenario())
    finally:
        if watcher is not None:
            await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_message_that_is_not_a_summary_is_dropped_counted_and_never_forwarded(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=4, speed=1.0)
    sim.startService()
    daemon = await start_nats_daemon(sim, server.url, "both")
    watcher = client = None
    try:
        async def scenario():
            nonlocal watcher, client
            edge = daemon.getServiceNamed("edge")
            await edge.when_symbols_loaded().asFuture(asyncio.get_running_loop())
            watcher = Watcher(grpc_port(daemon), ["ethbtc"])
            sim.pause()  # nothing real to forward from now on
            await wait_until(lambda: exact(sim, watcher, "ethbtc"), timeout=10)
            await asyncio.sleep(0.3)
            delivered = watcher.counts["ethbtc"]
            client = await nats.connect(server.url)
            for garbage in (b"\xff\xff\xff", b"not a summary", b""):  # b"": an empty Summary
                await client.publish("aggregator.summary.ethbtc", garbage)
            await client.flush()
            await wait_until(lambda: edge.dropped == 3, timeout=5)
            await asyncio.sleep(0.3)
            assert watcher.counts["ethbtc"] == delivered
            assert exact(sim, watcher, "ethbtc") and watcher.errors == []

        await aio(scenario())
    finally:
        if watcher is not None:
            await aio(watcher.close())
        if client is not None:
            await aio(client.close())
        await daemon.stopService()
        await sim.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_an_ingest_daemon_serves_health_only_not_serving_until_nats_is_up(tmp_path):
    from aggregator.nats.readiness import INGEST_SERVICE

    server = NatsServer(tmp_path, port=free_port())  # not started yet
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    daemon = await start_nats_daemon(sim, server.url, "ingest")
    try:
        async def scenario():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port(daemon)}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                async def status():
                    request = health_pb2.HealthCheckRequest(service=INGEST_SERVICE)
                    return (await within(stub.Check(request), 5)).status

                await asyncio.sleep(1.5)  # the exchanges are up by now, NATS is not
                assert await status() == NOT_SERVING
                server.start()
                await wait_until(lambda: daemon.getServiceNamed("bus").connected, timeout=10)
                for _ in range(50):  # the status follows within a reactor turn or two
                    if await status() == SERVING:
                        break
                    await asyncio.sleep(0.1)
                assert await status() == SERVING
                # No streams here: BookSummary is not served by an ingest daemon.
                call = channel.unary_stream("/orderbook.Aggregator/BookSummary")(b"")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await within(call.read(), 5)
                assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED

        await aio(scenario())
    finally:
        await daemon.stopService()
        await sim.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_tls_to_nats_with_a_ca_option(tmp_path):
    from tests.ops import self_signed

    cert, key = self_signed(tmp_path)
    server = NatsServer(tmp_path, tls=(cert, key))
    server.start()
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=6, speed=2.0)
    sim.startService()
    daemon = await start_nats_daemon(sim, server.url, "both", "--nats-tls-ca", str(cert))
    watcher = None
    try:
        async def scenario():
            nonlocal watcher
            loop = asyncio.get_running_loop()
            await daemon.getServiceNamed("edge").when_symbols_loaded().asFuture(loop)
            assert daemon.getServiceNamed("bus").client.connected_url.scheme == "tls"
            watcher = Watcher(grpc_port(daemon), ["ethbtc"])
            sim.pause()
            await wait_until(lambda: exact(sim, watcher, "ethbtc"), timeout=15)

        await aio(scenario())
    finally:
        if watcher is not None:
            await aio(watcher.close())
        await daemon.stopService()
        await sim.stopService()
        server.stop()
