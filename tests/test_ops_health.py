"""grpc.health.v1: SERVING once the server is up; the API services follow the
exchanges (NOT_SERVING while none is connected), and everything turns
NOT_SERVING when the server stops."""


import asyncio
import time

import grpc
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import reactor
from twisted.internet.error import CannotListenError

from aggregator.grpc_service import API_SERVICES, AggregatorServicer, GrpcServer
from aggregator.health import Health
from aggregator.merger import Merger
from aggregator.simulator import SimulatorService
from tests.aio import aio, within
from tests.e2e import start_daemon
from tests.fakes import FakeFeed

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ConnectingFeed(FakeFeed):
    """FakeFeed plus the connection state health reporting watches."""

    def __init__(self, name, symbols=None):
        super().__init__(name, symbols)
        self.connected = False
        self._listeners = []

    def add_connection_listener(self, listener):
        self._listeners.append(listener)

    def set_connected(self, connected):
        self.connected = connected
        for listener in self._listeners:
            listener(self.name, connected)


async def check(stub, service):
    return (await within(stub.Check(health_pb2.HealthCheckRequest(service=service)), 5)).status


@pytest_twisted.ensureDeferred
async def test_api_services_follow_the_exchanges_and_stop_turns_all_not_serving():
    binance, bitstamp = ConnectingFeed("binance", {"ethbtc"}), ConnectingFeed("bitstamp")
    merger = Merger([binance, bitstamp])
    merger.startService()
    server = GrpcServer(
        "127.0.0.1:0", AggregatorServicer(merger), health=Health([binance, bitstamp], API_SERVICES)
    )
    server.startService()
    await server.whenStarted()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def before_stop():
        assert await check(stub, "") == SERVING
        for service in API_SERVICES:
            assert await check(stub, service) == NOT_SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="orderbook.Aggregator"))
        assert (await within(watch.read(), 5)).status == NOT_SERVING
        bitstamp.set_connected(True)  # its symbol list is not loaded yet: still not up
        binance.set_connected(True)
        assert (await within(watch.read(), 5)).status == SERVING
        assert await check(stub, "orderbook.OrderbookAggregator") == SERVING
        binance.set_connected(False)
        assert (await within(watch.read(), 5)).status == NOT_SERVING
        bitstamp.load({"ethusd"})
        assert (await within(watch.read(), 5)).status == SERVING
        return watch

    watch = await aio(before_stop())
    stopped = server.stopService()

    async def during_stop():
        assert (await within(watch.read(), 5)).status == NOT_SERVING

    await aio(during_stop())
    await stopped
    await aio(channel.close())
    merger.stopService()


async def restart_on_the_same_ports(sim, seconds=10.0):
    """The daemon keeps connecting to the stopped simulator's ports, and on Linux a
    connect to a free port of the ephemeral range can pick that same port as its own
    and connect to itself: the port is then briefly taken (seen once in CI as "Address
    already in use"). The restart is retried until the port is free again."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            sim.startService()
            return
        except CannotListenError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_health_turns_serving_as_the_exchanges_come_up():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    await sim.stopService()  # the URLs stay: it listens on the same ports when restarted
    daemon = await start_daemon(sim)
    port = daemon.getServiceNamed("grpc").port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        async def exchanges_down():
            assert await check(stub, "") == SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="orderbook.OrderbookAggregator"))
            assert (await within(watch.read(), 5)).status == NOT_SERVING
            return watch

        watch = await aio(exchanges_down())
        await aio(restart_on_the_same_ports(sim))

        async def exchanges_up():
            assert (await within(watch.read(), 15)).status == SERVING
            assert await check(stub, "orderbook.Aggregator") == SERVING
            watch.cancel()
            await channel.close()

        await aio(exchanges_up())
    finally:
        await daemon.stopService()
        await sim.stopService()
