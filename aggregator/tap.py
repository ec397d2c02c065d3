"""`twistd aggregator`: options and the service tree.

Importing this module installs the asyncio reactor (grpc.aio needs it); twistd
imports it only once the subcommand is chosen and -r has been handled.
"""

from __future__ import annotations

import sys
from typing import Any

from aggregator.reactor import install_asyncio_reactor

install_asyncio_reactor()

from twisted.application.service import IServiceCollection, MultiService, Service  # noqa: E402
from twisted.python import usage  # noqa: E402

from aggregator import __version__  # noqa: E402
from aggregator.address import split_host_port  # noqa: E402
from aggregator.exchanges import FEEDS  # noqa: E402
from aggregator.exchanges.feed import ExchangeFeed  # noqa: E402
from aggregator.grpc_service import (  # noqa: E402
    API_SERVICES,
    AggregatorServicer,
    GrpcServer,
    Keepalive,
    Limits,
)
from aggregator.health import Health  # noqa: E402
from aggregator.jsonlog import use_json_log  # noqa: E402
from aggregator.merger import Merger  # noqa: E402
from aggregator.metrics_http import MetricsServer  # noqa: E402
from aggregator.nats.options import NATS_PARAMETERS, check_nats_options  # noqa: E402
from aggregator.symbols import InvalidSymbol, normalize  # noqa: E402
from aggregator.tls import BadKeyPair, read_key_pair  # noqa: E402

DEFAULT_URLS = {
    "binance-ws-url": "wss://stream.binance.com:9443",
    "binance-rest-url": "https://api.binance.com",
    "bitstamp-ws-url": "wss://ws.bitstamp.net",
    "bitstamp-rest-url": "https://www.bitstamp.net",
}
DEMO_SOURCES = ("synthetic", "recorded", "both")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Connects to the exchanges' public websocket feeds, keeps a correct order "
        "book per exchange and symbol, and streams the merged top of book to gRPC "
        "clients (orderbook.Aggregator/BookSummary). With --demo it runs against "
        "built-in exchange simulators on loopback: no internet needed."
    )
    optFlags = [
        ["demo", None, "Start local Binance and Bitstamp simulators and use them instead "
                       "of the live exchanges (the --*-url options are ignored)."],
    ]
    optParameters = [
        ["listen", "l", "[::1]:9051", "gRPC listen address, host:port ([::] or 0.0.0.0 for all)."],
        ["exchanges", "e", "binance,bitstamp", "Comma-separated exchanges to merge."],
        ["depth", "d", 10, "Levels per side in each Summary.", int],
        ["symbols", "s", "", "Comma-separated symbols to subscribe at start and keep."],
        ["binance-ws-url", None, DEFAULT_URLS["binance-ws-url"],
         "Binance websocket base; /stream is appended."],
        ["binance-rest-url", None, DEFAULT_URLS["binance-rest-url"],
         "Binance REST base; /api/v3/... is appended."],
        ["bitstamp-ws-url", None, DEFAULT_URLS["bitstamp-ws-url"], "Bitstamp websocket URL."],
        ["bitstamp-rest-url", None, DEFAULT_URLS["bitstamp-rest-url"],
         "Bitstamp REST base; /api/v2/... is appended."],
        ["demo-source", None, "both", "With --demo: synthetic, recorded or both."],
        ["demo-seed", None, 1, "With --demo: seed of the synthetic books.", int],
        ["demo-speed", None, 1.0, "With --demo: replay speed multiplier.", float],
        ["default-symbol", None, "ethbtc",
         "Symbol streamed by the challenge API orderbook.OrderbookAggregator/BookSummary(Empty)."],
        ["max-streams", None, 1000,
         "Concurrent BookSummary streams (both APIs); more get RESOURCE_EXHAUSTED.", int],
        ["max-symbols", None, 100,
         "Distinct symbols watched at once (clients' and --symbols); a stream for one more "
         "gets RESOURCE_EXHAUSTED.", int],
        ["metrics", None, "",
         "Serve Prometheus metrics at http://host:port/metrics, e.g. 127.0.0.1:9101; "
         "empty: off."],
        ["tls-cert", None, None,
         "PEM certificate chain: serve gRPC over TLS (with --tls-key); default plaintext."],
        ["tls-key", None, None, "PEM private key (unencrypted) of --tls-cert."],
        ["keepalive", None, 20.0,
         "Seconds between HTTP/2 pings to each client, to notice dead ones.", float],
        ["keepalive-timeout", None, 10.0,
         "Seconds without a ping's answer before a client is dropped.", float],
        ["log-format", None, "text",
         "text, or json: one JSON object per line, where twistd logs "
         "(stdout with -n, else --logfile)."],
        *NATS_PARAMETERS,  # scaling out (aggregator/nats/options.py)
    ]

    def opt_version(self) -> None:
        """Print the aggregator's version and exit."""
        print(f"aggregator {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        host, _, port = self["listen"].rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise usage.UsageError(f"--listen must be host:port, got {self['listen']!r}")
        exchanges = [name.strip().lower() for name in self["exchanges"].split(",") if name.strip()]
        unknown = [name for name in exchanges if name not in FEEDS]
        if not exchanges or unknown:
            raise usage.UsageError(
                f"--exchanges: unknown {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(FEEDS)}"
            )
        self["exchanges"] = list(dict.fromkeys(exchanges))
        if not 1 <= self["depth"] <= 1000:
            raise usage.UsageError("--depth must be between 1 and 1000")
        try:
            self["symbols"] = [normalize(s) for s in self["symbols"].split(",") if s.strip()]
        except InvalidSymbol as error:
            raise usage.UsageError(f"--symbols: {error}")
        if self["demo-source"] not in DEMO_SOURCES:
            raise usage.UsageError(f"--demo-source must be one of {', '.join(DEMO_SOURCES)}")
        if self["demo-speed"] <= 0:
            raise usage.UsageError("--demo-speed must be positive")
        self._check_operations()
        check_nats_options(self)

    def _check_operations(self) -> None:
        try:
            self["default-symbol"] = normalize(self["default-symbol"])
        except InvalidSymbol as error:
            raise usage.UsageError(f"--default-symbol: {error}")
        for option in ("max-streams", "max-symbols"):
            if self[option] < 1:
                raise usage.UsageError(f"--{option} must be at least 1")
        if len(set(self["symbols"])) > self["max-symbols"]:
            raise usage.UsageError("--symbols lists more symbols than --max-symbols allows")
        if self["metrics"]:
            try:
                split_host_port(self["metrics"])
            except ValueError:
                raise usage.UsageError(f"--metrics must be host:port, got {self['metrics']!r}")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        self["tls"] = None
        if self["tls-cert"] is not None:
            try:
                self["tls"] = read_key_pair(self["tls-cert"], self["tls-key"])
            except BadKeyPair as error:
                raise usage.UsageError(f"TLS: {error}")
        if not (self["keepalive"] > 0 and self["keepalive-timeout"] > 0):
            raise usage.UsageError("--keepalive and --keepalive-timeout must be positive")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        # Only twistd has a log to reformat (tests build the service directly).
        if self["log-format"] == "json" and self.parent is not None:
            try:
                use_json_log(self.parent)
            except ValueError as error:
                raise usage.UsageError(f"--log-format: {error}")


class DemoWiring(Service):
    """Points the feeds at the simulator once it listens (its ports are
    ephemeral, so they are known only after it started)."""

    def __init__(self, simulator: Any, feeds: list[ExchangeFeed]) -> None:
        self.simulator = simulator
        self.feeds = feeds

    def startService(self) -> None:
        super().startService()
        for feed in self.feeds:
            feed.ws_url = self.simulator.urls[f"{feed.name}_ws_url"]
            feed.rest_url = self.simulator.urls[f"{feed.name}_rest_url"]


def makeService(options: Options, reactor: Any = None) -> IServiceCollection:
    """Children start in this order and stop in reverse: the gRPC server ends
    the streams first, the simulator (if any) goes last."""
    if reactor is None:
        from twisted.internet import reactor
    if options["nats-config"] is not None:
        from aggregator.nats.wiring import make_scaled_service

        return make_scaled_service(options, options["nats-config"], reactor)
    root = MultiService()
    if options["metrics"]:
        # First to start, last to stop: the metrics cover the whole run.
        metrics_server = MetricsServer(options["metrics"], reactor)
        metrics_server.setName("metrics")
        metrics_server.setServiceParent(root)
    feeds = [
        FEEDS[name](
            options[f"{name}-ws-url"], options[f"{name}-rest-url"], reactor=reactor
        )
        for name in options["exchanges"]
    ]
    if options["demo"]:
        from aggregator.simulator import SimulatorService

        simulator = SimulatorService(
            reactor=reactor,
            source=options["demo-source"],
            seed=options["demo-seed"],
            speed=options["demo-speed"],
        )
        simulator.setName("simulator")
        simulator.setServiceParent(root)
        DemoWiring(simulator, feeds).setServiceParent(root)
    for feed in feeds:
        feed.setName(feed.name)
        feed.setServiceParent(root)
    merger = Merger(feeds, depth=options["depth"], pinned=options["symbols"])
    merger.setName("merger")
    merger.setServiceParent(root)
    servicer = AggregatorServicer(
        merger,
        default_symbol=options["default-symbol"],
        limits=Limits(options["max-streams"], options["max-symbols"]),
        clock=reactor,
    )
    server = GrpcServer(
        options["listen"],
        servicer,
        health=Health(feeds, API_SERVICES),
        tls=options["tls"],
        keepalive=Keepalive(options["keepalive"], options["keepalive-timeout"]),
    )
    server.setName("grpc")
    server.setServiceParent(root)
    return root
