"""`aggregator-sim`: run the exchange simulator on its own until SIGINT/SIGTERM."""

from __future__ import annotations

import sys
from typing import Any, Sequence, TextIO

from twisted.python import usage

from .service import SOURCES, SimulatorService


class Options(usage.Options):
    synopsis = "Usage: aggregator-sim [options]"
    longdesc = (
        "Serves Binance- and Bitstamp-compatible market data (websocket + REST) on local ports, "
        "from synthetic random-walk books and/or recorded books, for the aggregator daemon. "
        "Recorded data: this product includes software developed by Bryant Moscon "
        "(http://www.bryantmoscon.com/)."
    )
    optFlags = [
        ["no-loop", None, "Play the data once, then stay quiet (synthetic books stop after 200 changes)."],
    ]
    optParameters = [
        ["source", None, "both", "Data source: synthetic, recorded or both."],
        ["seed", None, 1, "Seed of the synthetic books.", int],
        ["speed", None, 1.0, "Time multiplier (recorded gaps divided, synthetic rates multiplied).", float],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["binance-ws-port", None, 0, "Binance websocket port (0 = any free port).", int],
        ["binance-rest-port", None, 0, "Binance REST port (0 = any free port).", int],
        ["bitstamp-ws-port", None, 0, "Bitstamp websocket port (0 = any free port).", int],
        ["bitstamp-rest-port", None, 0, "Bitstamp REST port (0 = any free port).", int],
    ]

    def postOptions(self) -> None:
        if self["source"] not in SOURCES:
            raise usage.UsageError(f"--source must be one of {', '.join(SOURCES)}")
        if not self["speed"] > 0:
            raise usage.UsageError("--speed must be > 0")
        for name in ("binance-ws-port", "binance-rest-port", "bitstamp-ws-port", "bitstamp-rest-port"):
            if not 0 <= self[name] <= 65535:
                raise usage.UsageError(f"--{name} must be a port number")


def make_service(options: Options, reactor: Any = None) -> SimulatorService:
    return SimulatorService(
        reactor=reactor,
        source=options["source"],
        seed=options["seed"],
        speed=options["speed"],
        loop=not options["no-loop"],
        host=options["host"],
        ports={
            "binance_ws": options["binance-ws-port"],
            "binance_rest": options["binance-rest-port"],
            "bitstamp_ws": options["bitstamp-ws-port"],
            "bitstamp_rest": options["bitstamp-rest-port"],
        },
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

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    sim = make_service(options, reactor)
    try:
        sim.startService()
    except Exception as e:  # e.g. a port already in use
        print(f"aggregator-sim: cannot listen: {e}", file=sys.stderr)
        return 1
    print(describe(sim.urls), file=out, flush=True)
    # reactor.run() turns SIGINT/SIGTERM into a shutdown; this trigger makes the shutdown wait
    # for the listeners to close and the clients to be dropped.
    reactor.addSystemEventTrigger("before", "shutdown", sim.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
