"""aggregator-client, as a real process, against a daemon that restarts under it."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred

from aggregator.simulator import SimulatorService
from tests.aio import aio, wait_until
from tests.e2e import start_daemon
from tests.ops import free_port

ROOT = Path(__file__).resolve().parent.parent


class ClientProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()

    @property
    def lines(self):
        return self.out.decode().splitlines()

    @property
    def errors(self):
        return self.err.decode()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def spawn_client(*argv):
    client = ClientProcess()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client.transport = reactor.spawnProcess(
        client, sys.executable, [sys.executable, "-m", "aggregator.client", *argv], env=env)
    return client


@pytest_twisted.ensureDeferred
async def test_client_rides_through_a_daemon_restart():
    sim = SimulatorService(reactor=reactor, source="synthetic", seed=1, speed=1.0)
    sim.startService()
    address = f"127.0.0.1:{free_port()}"
    daemon = await start_daemon(sim, "--listen", address)
    client = spawn_client("ethbtc", "--addr", address, "--json")
    try:
        await aio(wait_until(lambda: len(client.lines) >= 1, timeout=10))
        await daemon.stopService()
        await aio(wait_until(lambda: "reconnecting in" in client.errors, timeout=5))
        shown_before_restart = len(client.lines)
        daemon = await start_daemon(sim, "--listen", address)
        await aio(wait_until(lambda: len(client.lines) > shown_before_restart + 1, timeout=15))
        assert client.errors.splitlines() == [
            "aggregator-client: the daemon ended the stream; reconnecting in "
            + client.errors.split("reconnecting in ")[1].split("\n")[0],
            "aggregator-client: reconnected",
        ]
        assert json.loads(client.lines[-2])["symbol"] == "ethbtc"
        # Still running: it never gave up on the daemon. Ctrl-C ends it quietly.
        client.transport.signalProcess(signal.SIGINT)
        assert await client.ended == 130
    finally:
        if client.transport.pid is not None:
            client.transport.signalProcess(signal.SIGKILL)
        await daemon.stopService()
        await sim.stopService()
