"""`aggregator-sim`: run the exchange simulator on its own until SIGINT/SIGTERM."""

from __future__ import annotations

import sys
from typing import Any, Sequence, TextIO, cast

from twisted.python import usage

from .scale import DEFAULT_RATE, DEFAULT_SYMBOLS, DEFAULT_TICK
from .replay import ReplayService
from .service import SOURCES, SimulatorService, parse_fault_names
from .venues import EXCHANGES

# --<venue>-ws-port and --<venue>-rest-port for every venue.
PORT_OPTIONS = tuple(
    (f"{name}-{kind}-port", None, 0, f"{name.capitalize()} {label} port (0 = any free port).", int)
    for name in EXCHANGES
    for kind, label in (("ws", "websocket"), ("rest", "REST"))
)


class Options(usage.Options):
    synopsis = "Usage: aggregator-sim [options]"
    longdesc = (
        "Serves Binance- and Bitstamp-compatible market data (websocket + REST) on local ports, "
        "from synthetic random-walk books and/or recorded books, for the aggregator daemon; "
        "--source scale generates --symbols books changing --rate times a second in total, for "
        "benchmarks. --faults random injects a random recoverable fault every --fault-interval "
        "seconds; faults can also be injected from another process with "
        "POST <rest url>/_sim/fault/<name>?exchange=..&symbol=.. and counters read with "
        "GET <rest url>/_sim/status (see aggregator/simulator/FAULTS.md). "
        "Recorded data: this product includes software developed by Bryant Moscon "
        "(http://www.bryantmoscon.com/)."
    )
    optFlags = [
        ["no-loop", None, "Play the data once, then stay quiet (synthetic books stop after 200 changes)."],
    ]
    optParameters = [
        ["source", None, "both", "Data source: synthetic, recorded, both or scale."],
        ["seed", None, 1, "Seed of the synthetic books.", int],
        ["speed", None, 1.0, "Time multiplier (recorded gaps divided, synthetic rates multiplied).", float],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        *PORT_OPTIONS,
        ["symbols", None, DEFAULT_SYMBOLS, "Scale mode: number of generated symbols.", int],
        ["rate", None, DEFAULT_RATE, "Scale mode: Binance change events per second, all symbols together.", float],
        ["bitstamp-rate", None, None, "Scale mode: Bitstamp change events per second (default rate/10).", float],
        ["tick", None, DEFAULT_TICK, "Scale mode: generation interval in seconds.", float],
        ["faults", None, "none", "none, random, or comma-separated fault names to inject at random."],
        ["fault-interval", None, 5.0, "Seconds between random faults.", float],
        ["replay", None, None, "Replay this --record directory instead of a --source (docs/RECORDING.md); "
                               "--speed 0: as fast as possible."],
        ["weight-limit", None, 6000, "Binance REST request weight per minute before 429.", int],
        ["ban-seconds", None, 120.0, "Binance 418 ban length in seconds.", float],
    ]

    def postOptions(self) -> None:
        if self["source"] not in SOURCES:
            raise usage.UsageError(f"--source must be one of {', '.join(SOURCES)}")
        if self["replay"] is not None:
            from .replay import BadRecording, load_recording

            if self["speed"] < 0:
                raise usage.UsageError("--speed must be >= 0 with --replay")
            try:
                self["recording"] = load_recording(self["replay"])
            except BadRecording as e:
                raise usage.UsageError(str(e)) from None
        elif not self["speed"] > 0:
            raise usage.UsageError("--speed must be > 0")
        for name, _, _, _, _ in PORT_OPTIONS:
            if not 0 <= self[name] <= 65535:
                raise usage.UsageError(f"--{name} must be a port number")
        if self["symbols"] < 1:
            raise usage.UsageError("--symbols must be >= 1")
        for name in ("rate", "tick", "fault-interval"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be > 0")
        if self["bitstamp-rate"] is not None and self["bitstamp-rate"] < 0:
            raise usage.UsageError("--bitstamp-rate must be >= 0")
        if self["weight-limit"] < 1 or self["ban-seconds"] < 0:
            raise usage.UsageError("--weight-limit must be >= 1 and --ban-seconds >= 0")
        try:
            parse_fault_names(self["faults"])
        except ValueError as e:
            raise usage.UsageError(f"--faults: {e}") from None


def make_service(options: Options, reactor: Any = None) -> SimulatorService | ReplayService:
    ports = {name.removesuffix("-port").replace("-", "_"): options[name] for name, _, _, _, _ in PORT_OPTIONS}
    if options["replay"] is not None:
        return ReplayService(options["recording"], reactor=reactor, speed=options["speed"], host=options["host"],
                             ports=ports)
    return SimulatorService(
        reactor=reactor,
        source=options["source"],
        seed=options["seed"],
        speed=options["speed"],
        loop=not options["no-loop"],
        host=options["host"],
        ports=ports,
        symbols=options["symbols"],
        rate=options["rate"],
        bitstamp_rate=options["bitstamp-rate"],
        tick=options["tick"],
        faults=options["faults"],
        fault_interval=options["fault-interval"],
        rest_weight_limit=options["weight-limit"],
        rest_ban_seconds=options["ban-seconds"],
    )


def describe(urls: dict[str, str]) -> str:
    """The URLs, and the daemon flags that point it at them, ready to paste."""
    lines = [f"{name}: {url}" for name, url in urls.items()]
    flags = " ".join(f"--{name.replace('_', '-')} {url}" for name, url in urls.items())
    lines += ["", "daemon flags:", flags]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        print(f"{options.synopsis}\naggregator-sim: {e}", file=sys.stderr)
        return 2

    from twisted.internet import reactor as global_reactor
    from twisted.logger import ILogObserver, globalLogBeginner, textFileLogObserver

    # Typed as what it is: mypy cannot check calls against twisted's zope interfaces.
    reactor: Any = global_reactor
    observer = cast(ILogObserver, textFileLogObserver(sys.stderr))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    sim = make_service(options, reactor)
    if options["source"] == "scale" and options["replay"] is None:
        # This process is the simulator alone: keep the collector off the long-lived heap
        # (recorded listings, books) and collect young objects less often. ~20% more events/s.
        import gc

        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
    try:
        sim.startService()
    except Exception as e:  # e.g. a port already in use
        print(f"aggregator-sim: cannot listen: {e}", file=sys.stderr)
        return 1
    # reactor.run() turns SIGINT/SIGTERM into a shutdown; this trigger makes the shutdown wait
    # for the listeners to close and the clients to be dropped.
    reactor.addSystemEventTrigger("before", "shutdown", sim.stopService)
    # The URLs are printed once the reactor runs, i.e. after its signal handlers are in place:
    # whoever waits for them may send SIGINT right away.
    reactor.callWhenRunning(lambda: print(describe(sim.urls), file=out, flush=True))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
