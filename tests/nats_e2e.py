"""Shared pieces of the NATS tests: daemons built by the twistd plugin with --nats."""

from __future__ import annotations

from tests.e2e import plugin


def nats_options(sim, nats_url: str, role: str, *extra: str, lease: float = 1.0):
    options = plugin().options()
    args = ["--listen", "127.0.0.1:0", "--nats", nats_url, "--nats-role", role,
            "--nats-lease", str(lease), *extra]
    if sim is not None:
        args += [
            "--binance-ws-url", sim.urls["binance_ws_url"],
            "--binance-rest-url", sim.urls["binance_rest_url"],
            "--bitstamp-ws-url", sim.urls["bitstamp_ws_url"],
            "--bitstamp-rest-url", sim.urls["bitstamp_rest_url"],
        ]
    options.parseOptions(args)
    return options


async def start_nats_daemon(sim, nats_url: str, role: str, *extra: str, lease: float = 1.0):
    """An in-process daemon; its gRPC port (edge, both) is daemon.getServiceNamed("grpc").port."""
    daemon = plugin().makeService(nats_options(sim, nats_url, role, *extra, lease=lease))
    daemon.startService()
    if role != "ingest":
        await daemon.getServiceNamed("grpc").whenStarted()
    return daemon


def grpc_port(daemon) -> int:
    return daemon.getServiceNamed("grpc").port
