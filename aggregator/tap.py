"""`twistd aggregator`: options and the service tree.

The options install the asyncio reactor (grpc.aio needs it) on the event loop
of --loop, once parsed: twistd imports this module when the subcommand is
chosen, after -r was handled, and nothing imported here may import
twisted.internet.reactor (tests/test_loops.py checks), or the loop could no
longer be chosen.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from aggregator import __version__, metrics
from aggregator.address import CannotListen, check_can_listen, split_host_port
from aggregator.exchanges import VENUES
from aggregator.exchanges.feed import VenueFeed
from aggregator.gcpause import GC_MODES, GcTuning
from aggregator.grpc_service import (
    API_SERVICES,
    AggregatorServicer,
    GrpcServer,
    Keepalive,
    Limits,
    SummarySource,
)
from aggregator.health import Health, HealthFeed
from aggregator.jsonlog import use_json_log
from aggregator.merger import Merger
from aggregator.metrics_http import MetricsServer
from aggregator.nats.options import NATS_PARAMETERS, check_nats_options
from aggregator.reactor import LOOPS, default_loop, install_asyncio_reactor, loop_version
from aggregator.symbols import InvalidSymbol, normalize
from aggregator.tls import BadKeyPair, KeyPair, read_client_ca, read_key_pair

if TYPE_CHECKING:
    from aggregator.simulator import SimulatorService
    from aggregator.simulator.replay import ReplayService

DEFAULT_URLS = {
    f"{name}-{kind}-url": url
    for name, venue in VENUES.items()
    for kind, url in (("ws", venue.default_ws_url), ("rest", venue.default_rest_url))
}
DEMO_SOURCES = ("synthetic", "recorded", "both")
COMMAND = "twistd aggregator"
DEMO_WEB = "127.0.0.1:9080"  # the live view's address with --demo


class _Coerce(usage.CoerceParameter):
    """Says which option wanted what: Twisted's own message is "Parameter type
    enforcement failed: invalid literal for int() with base 10: 'abc'"."""

    _EXPECTED = {int: "a whole number", float: "a number"}

    def dispatch(self, parameterName: str, value: str | None) -> None:
        try:
            super().dispatch(parameterName, value)
        except usage.UsageError:
            if value is None:
                raise
            expected = self._EXPECTED.get(self.coerce, "valid")
            raise usage.UsageError(
                f"--{parameterName} must be {expected}, got {value!r}"
            ) from None


class StartupError(usage.UsageError):
    """Not a mistake in the command line, so no pointer to --help."""


class Options(usage.Options):
    log = Logger()
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
        # -- live web view (aggregator/web/) --
        ["no-web", None, "Do not serve the live view (with --demo it is on by default)."],
        ["merge-every-frame", None,
         "Merge and publish after every frame a book commits, instead of once per reactor "
         "turn for all of a symbol's frames in it: clients see every book state, at more CPU "
         "under load. Implied by --demo-source replay:DIR, so that a replay's Summaries do "
         "not depend on how its frames were grouped into reads."],
    ]
    optParameters = [
        ["listen", "l", "[::1]:9051", "gRPC listen address, host:port ([::] or 0.0.0.0 for all)."],
        ["exchanges", "e", ",".join(VENUES), "Comma-separated exchanges to merge."],
        ["depth", "d", 10, "Levels per side in each Summary.", int],
        ["symbols", "s", "", "Comma-separated symbols to subscribe at start and keep."],
        *(
            [f"{name}-{kind}-url", None, DEFAULT_URLS[f"{name}-{kind}-url"], help]
            for name, venue in VENUES.items()
            for kind, help in (("ws", venue.ws_url_help), ("rest", venue.rest_url_help))
        ),
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
         "a port alone binds loopback (127.0.0.1); empty: off."],
        ["tls-cert", None, None,
         "PEM certificate chain: serve gRPC over TLS (with --tls-key); default plaintext."],
        ["tls-key", None, None, "PEM private key (unencrypted) of --tls-cert."],
        ["tls-client-ca", None, None,
         "PEM CA certificate(s): with --tls-cert, only clients presenting a certificate "
         "signed by one of them may connect (mutual TLS)."],
        ["keepalive", None, 20.0,
         "Seconds between HTTP/2 pings to each client, to notice dead ones.", float],
        ["keepalive-timeout", None, 10.0,
         "Seconds without a ping's answer before a client is dropped.", float],
        ["gc", None, "tuned",
         "Garbage collector: tuned (freeze the start-up heap, collect young objects less "
         "often: shorter, rarer pauses) or python (Python's defaults)."],
        ["loop", None, None,
         "Event loop under the asyncio reactor: uvloop or asyncio (the standard "
         "library's). Default uvloop where it can be imported, else asyncio."],
        ["log-format", None, "text",
         "text, or json: one JSON object per line, where twistd logs "
         "(stdout with -n, else --logfile)."],
        *NATS_PARAMETERS,  # scaling out (aggregator/nats/options.py)
        # -- record and replay (aggregator/recording.py, docs/RECORDING.md) --
        ["record", None, None,
         "Record every venue connection's frames and REST answers into this directory "
         "(gzip JSON lines, docs/RECORDING.md); replay with aggregator-sim --replay DIR."],
        ["record-max-mb", None, 1024, "With --record: disk cap in MB; the oldest files go first.",
         int],
        # -- live web view (aggregator/web/) --
        ["web", None, None,
         "Serve the live view (the merged ladder in a browser) at http://host:port/, e.g. "
         "127.0.0.1:9080; a port alone binds loopback (127.0.0.1); empty: off. Default "
         f"off, {DEMO_WEB} with --demo."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, dispatcher in self._dispatch.items():
            if isinstance(dispatcher, usage.CoerceParameter):
                self._dispatch[name] = _Coerce(self, dispatcher.coerce)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Under twistd, an error is one line on stderr and exit status 1:
        twistd itself would print the whole help first, burying the error."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if self.parent is None:  # built directly (tests): the caller decides
                raise
            hint = "" if isinstance(error, StartupError) else f" (see {COMMAND} --help)"
            sys.stderr.write(f"{COMMAND}: error: {error}{hint}\n")
            raise SystemExit(1) from None

    def opt_version(self) -> None:
        """Print the aggregator's version and exit."""
        print(f"aggregator {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        # First: the reactor is there for everything after (ports, NATS, ...).
        self._install_reactor()
        try:
            split_host_port(self["listen"])
        except ValueError as error:
            raise usage.UsageError(f"--listen: {error}")
        exchanges = [name.strip().lower() for name in self["exchanges"].split(",") if name.strip()]
        unknown = [name for name in exchanges if name not in VENUES]
        if not exchanges or unknown:
            raise usage.UsageError(
                f"--exchanges: unknown {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(VENUES)}"
            )
        self["exchanges"] = list(dict.fromkeys(exchanges))
        if not 1 <= self["depth"] <= 1000:
            raise usage.UsageError("--depth must be between 1 and 1000")
        try:
            self["symbols"] = [normalize(s) for s in self["symbols"].split(",") if s.strip()]
        except InvalidSymbol as error:
            raise usage.UsageError(f"--symbols: {error}")
        self._check_recording()
        if self["demo-source"] not in DEMO_SOURCES and not self["demo-source"].startswith("replay:"):
            raise usage.UsageError(
                f"--demo-source must be one of {', '.join(DEMO_SOURCES)} or replay:DIR"
            )
        if self["demo-speed"] <= 0:
            raise usage.UsageError("--demo-speed must be positive")
        if self["gc"] not in GC_MODES:
            raise usage.UsageError(f"--gc must be one of {', '.join(GC_MODES)}")
        self._check_operations()
        self._web()
        check_nats_options(self)
        # Last: once the command line is known to be right. Only twistd binds
        # (tests build the service directly, on ports of their own).
        if self.parent is not None:
            self._check_ports()

    def _install_reactor(self) -> None:
        """--loop: install the reactor on that loop, or check the one installed."""
        asked = self["loop"]
        if asked is not None and asked not in LOOPS:
            raise usage.UsageError(f"--loop must be one of {', '.join(LOOPS)}, got {asked!r}")
        usable, why_not_uvloop = default_loop()
        if asked == "uvloop" and why_not_uvloop is not None:
            raise StartupError(f"--loop uvloop: {why_not_uvloop}")
        running = install_asyncio_reactor(asked or usable)
        # A reactor installed before (twistd -r asyncio, a test's) keeps its
        # loop: fine unless another was asked for by name.
        if asked is not None and running != asked:
            raise StartupError(
                f"--loop {asked}: the reactor already runs on {running} "
                "(installed before the options were read, e.g. by twistd -r asyncio)"
            )
        self["loop"] = running
        metrics.BUILD.info({"version": __version__, "event_loop": running})
        since = f", since {why_not_uvloop}" if asked is None and why_not_uvloop else ""
        self.log.info("event loop: {loop}{since}", loop=loop_version(running), since=since)

    def _check_recording(self) -> None:
        """--record and --demo-source replay:DIR (aggregator/recording.py, simulator/replay.py)."""
        if self["record-max-mb"] < 1:
            raise usage.UsageError("--record-max-mb must be at least 1")
        if self["record"] is not None:
            from aggregator.recording import CannotRecord, check_writable

            try:
                check_writable(self["record"])
            except CannotRecord as error:
                raise StartupError(f"--record: {error}")
        if self["demo-source"].startswith("replay:"):
            from aggregator.simulator.replay import BadRecording, load_recording

            try:
                self["replay"] = load_recording(self["demo-source"].removeprefix("replay:"))
            except BadRecording as error:
                raise StartupError(f"--demo-source: {error}")
            self["merge-every-frame"] = True

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
        if self["metrics"].isdigit():
            # Metrics are plain HTTP: only where asked for beyond this machine.
            self["metrics"] = f"127.0.0.1:{self['metrics']}"
        if self["metrics"]:
            try:
                split_host_port(self["metrics"])
            except ValueError as error:
                raise usage.UsageError(f"--metrics: {error} (or a port alone)")
        self["tls"] = self._tls()
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

    # -- live web view (aggregator/web/) --
    web_by_default = False  # --demo's address, not one asked for

    def _web(self) -> None:
        """self["web"]: the live view's host:port, or "" for off."""
        if self["no-web"]:
            self["web"] = ""
        elif self["web"] is None:
            self["web"] = DEMO_WEB if self["demo"] else ""
            self.web_by_default = bool(self["web"])
        elif self["web"].isdigit():
            # Plain HTTP, no authentication: beyond this machine only when asked.
            self["web"] = f"127.0.0.1:{self['web']}"
        if self["web"]:
            try:
                split_host_port(self["web"])
            except ValueError as error:
                raise usage.UsageError(f"--web: {error} (or a port alone)")

    def _tls(self) -> KeyPair | None:
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-client-ca"] is not None and self["tls-cert"] is None:
            raise usage.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        if self["tls-cert"] is None:
            return None
        try:
            pair = read_key_pair(self["tls-cert"], self["tls-key"])
            if self["tls-client-ca"] is not None:
                pair = replace(pair, client_ca=read_client_ca(self["tls-client-ca"]))
        except BadKeyPair as error:
            raise usage.UsageError(f"TLS: {error}")
        return pair

    def _check_ports(self) -> None:
        ports = [("listen for gRPC", self["listen"])]
        if self["metrics"]:
            ports.append(("serve metrics", self["metrics"]))
        for what, address in ports:
            try:
                check_can_listen(what, address)
            except CannotListen as error:
                raise StartupError(str(error))
        if self["web"]:  # live web view
            try:
                check_can_listen("serve the live view", self["web"])
            except CannotListen as error:
                if not self.web_by_default:
                    raise StartupError(str(error))
                # Not asked for: a second demo (or a test's) must still start.
                sys.stderr.write(f"{COMMAND}: warning: {error}; live view off (--web picks "
                                 "another address)\n")
                self["web"] = ""


class DemoWiring(Service):
    """Points the feeds at the simulator once it listens (its ports are
    ephemeral, so they are known only after it started)."""

    def __init__(self, simulator: SimulatorService | ReplayService, feeds: list[VenueFeed]) -> None:
        self.simulator = simulator
        self.feeds = feeds

    def startService(self) -> None:
        super().startService()
        for feed in self.feeds:
            feed.ws_url = self.simulator.urls[f"{feed.name}_ws_url"]
            feed.rest_url = self.simulator.urls[f"{feed.name}_rest_url"]


def add_metrics(root: MultiService, options: Options, reactor: Any) -> None:
    """With --metrics, the metrics listener; added first so that it starts
    first and stops last: the metrics cover the whole run."""
    if options["metrics"]:
        metrics_server = MetricsServer(options["metrics"], reactor)
        metrics_server.setName("metrics")
        metrics_server.setServiceParent(root)


def add_grpc_api(
    root: MultiService,
    options: Options,
    source: SummarySource,
    health_feeds: Sequence[HealthFeed],
    reactor: Any,
) -> None:
    """Both gRPC APIs, health and reflection on --listen, streaming from
    `source` (the merger, or a NATS edge)."""
    servicer = AggregatorServicer(
        source,
        default_symbol=options["default-symbol"],
        limits=Limits(options["max-streams"], options["max-symbols"]),
        clock=reactor,
    )
    server = GrpcServer(
        options["listen"],
        servicer,
        health=Health(health_feeds, API_SERVICES),
        tls=options["tls"],
        keepalive=Keepalive(options["keepalive"], options["keepalive-timeout"]),
    )
    server.setName("grpc")
    server.setServiceParent(root)


def add_feeds(root: MultiService, options: Options, reactor: Any) -> list[VenueFeed]:
    """The enabled venues' feeds (and, with --demo, the simulator they use;
    with --record, the recorder) as children of `root`: the simulator first,
    so it stops last."""
    feeds = [
        VenueFeed(
            VENUES[name], options[f"{name}-ws-url"], options[f"{name}-rest-url"], reactor=reactor
        )
        for name in options["exchanges"]
    ]
    if options["demo"] and options.get("replay") is not None:
        from aggregator.simulator.replay import ReplayService

        simulator = ReplayService(options["replay"], reactor=reactor, speed=options["demo-speed"])
        simulator.setName("simulator")
        simulator.setServiceParent(root)
        DemoWiring(simulator, feeds).setServiceParent(root)
    elif options["demo"]:
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
    if options["record"] is not None:
        add_recorder(root, options, feeds, reactor)
    return feeds


def add_recorder(root: MultiService, options: Options, feeds: list[VenueFeed], reactor: Any) -> None:
    """--record: the feeds' traffic to disk. After the feeds, so that it stops
    first: the connections closed by the daemon's own shutdown are not recorded
    (a replay would close them). Nothing is lost by starting after the feeds:
    what they queue before the writer thread runs waits for it."""
    from aggregator.recording import Recorder, RecordingFiles

    recorder = Recorder(
        reactor, RecordingFiles(options["record"], options["record-max-mb"] * 1024 * 1024)
    )
    recorder.setName("recorder")
    recorder.setServiceParent(root)
    for feed in feeds:
        feed.record_to(recorder.venue(feed.name))


def merge_clock(options: Any, reactor: Any) -> Any:
    """The merger's reactor: None (a merge per frame) with --merge-every-frame."""
    return None if options["merge-every-frame"] else reactor


def makeService(options: Options, reactor: Any = None) -> IServiceCollection:
    """Children start in this order and stop in reverse: the gRPC server ends
    the streams first, the simulator (if any) goes last."""
    if reactor is None:
        from twisted.internet import reactor
    if options["nats-config"] is not None:
        from aggregator.nats.wiring import make_scaled_service

        return make_scaled_service(options, options["nats-config"], reactor)
    root = MultiService()
    GcTuning(options["gc"], reactor).setServiceParent(root)
    add_metrics(root, options, reactor)
    feeds = add_feeds(root, options, reactor)
    merger = Merger(feeds, depth=options["depth"], pinned=options["symbols"],
                    reactor=merge_clock(options, reactor))
    merger.setName("merger")
    merger.setServiceParent(root)
    add_grpc_api(root, options, merger, feeds, reactor)
    # -- live web view (aggregator/web/) --
    if options["web"]:
        from aggregator.web import WebServer

        # Last to start, first to stop: its pages close before the merger ends
        # their subscriptions. Browsers are bounded like gRPC streams (counted
        # apart from them) and share --max-symbols with them.
        web = WebServer(
            options["web"],
            merger,
            default_symbol=options["default-symbol"],
            max_clients=options["max-streams"],
            max_symbols=options["max-symbols"],
            reactor=reactor,
            keepalive=(options["keepalive"], options["keepalive-timeout"]),
        )
        web.setName("web")
        web.setServiceParent(root)
    return root
