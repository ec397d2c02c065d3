"""Shared pieces of the NATS tests: daemons built by the twistd plugin with --nats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from aggregator.simulator.venues import EXCHANGES
from tests.e2e import plugin

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def nats_options(sim, nats_url: str, role: str, *extra: str, lease: float = 1.0):
    options = plugin().options()
    args = ["--listen", "127.0.0.1:0", "--nats", nats_url, "--nats-role", role,
            "--nats-lease", str(lease), *extra]
    if sim is not None:
        args += sim_args(sim)
    options.parseOptions(args)
    return options


async def start_nats_daemon(sim, nats_url: str, role: str, *extra: str, lease: float = 1.0):
    """An in-process daemon; its gRPC port (the API, or health only for ingest) is grpc_port(daemon)."""
    daemon = plugin().makeService(nats_options(sim, nats_url, role, *extra, lease=lease))
    daemon.startService()
    await daemon.getServiceNamed("grpc").whenStarted()
    return daemon


def grpc_port(daemon) -> int:
    return daemon.getServiceNamed("grpc").port


def sim_args(sim) -> list[str]:
    """Every simulated venue, each at the simulator's URLs (never a live one)."""
    args = ["--exchanges", ",".join(EXCHANGES)]
    for key, url in sim.urls.items():
        args += [f"--{key.replace('_', '-')}", url]
    return args


class DaemonProcess:
    """`twistd -n aggregator --nats-role ROLE` in its own process, so that a test
    can kill it for real (SIGKILL: no lease or demand handed back)."""

    def __init__(self, role: str, sim, nats_url: str, log_path: Path, *extra: str,
                 lease: float = 1.0, listen: str = "127.0.0.1:0") -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "aggregator", "--listen", listen,
             "--nats", nats_url, "--nats-role", role, "--nats-lease", str(lease),
             *(sim_args(sim) if sim is not None else []), *extra],
            cwd=log_path.parent, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def ingest_subscriptions(sim, symbol: str) -> dict[str, int]:
    """Websocket subscriptions the simulator serves for `symbol`, per exchange."""
    return {
        "binance": sim._venues["binance"].hub.subscribers(f"{symbol}@depth@100ms"),
        "bitstamp": sim._venues["bitstamp"].hub.subscribers(f"order_book_{symbol}"),
    }


def IngestProcess(sim, nats_url: str, log_path: Path, *extra: str, lease: float = 1.0) -> DaemonProcess:
    return DaemonProcess("ingest", sim, nats_url, log_path, *extra, lease=lease)
