"""grpc.aio runs on asyncio: the daemon needs Twisted's asyncio reactor.

Without it grpc.aio accepts connections but never serves them, and shutdown
hangs. aggregator.tap installs it once its options are parsed (the event loop
under it is one of them, --loop), i.e. after twistd handled -r (if any) and
before anything else imports the reactor.

The loop: uvloop by default where it imports (libuv: a cheaper loop per
event; the measurements are in docs/DESIGN.md), else the standard library's. On uvloop,
Twisted never hears of SIGCHLD (uvloop owns the signal wake-up fd while it
runs): the daemon spawns no processes; a feature that does must reap them
(conftest.py does, for the tests).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, cast

from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)


class IncompatibleReactor(SystemExit):
    pass


if TYPE_CHECKING:
    # treq types its `reactor=` arguments with its own (private) interface of
    # the same three as below: extend it, so that treq accepts this type too.
    from treq._types import _ITreqReactor

    class IDaemonReactor(_ITreqReactor):
        """IReactorTCP, IReactorTime and IReactorPluggableNameResolver: see below."""

else:

    class IDaemonReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
        """The reactor interfaces the daemon's parts use together, as one type.

        TCP (websocket and REST connections, the metrics listener), time
        (timers, rate limits, latency) and name resolution (HostnameEndpoint,
        treq's Agent): Twisted has no single interface for these. For type
        annotations only: reactors provide the interfaces it extends, not it.
        """


def installed_reactor() -> IDaemonReactor:
    """The global reactor (installing the default one if none is yet), typed.

    Type checkers see `from twisted.internet import reactor` as a module.
    """
    from twisted.internet import reactor

    return cast(IDaemonReactor, reactor)


# --loop: the event loop under the reactor.
LOOPS = ("uvloop", "asyncio")


def default_loop() -> tuple[str, str | None]:
    """The loop used unless told otherwise, and why it is not uvloop when it is not."""
    try:
        import uvloop  # noqa: F401
    except ImportError as error:
        # Not installed where it does not build (Windows, PyPy: setup.cfg).
        return "asyncio", f"uvloop cannot be imported ({error})"
    return "uvloop", None


def loop_version(loop: str) -> str:
    """`loop` and its version, for the start-up log line."""
    if loop == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return f"{loop} (Python {sys.version.split()[0]})"


def _loop_name(eventloop: asyncio.AbstractEventLoop) -> str:
    # uvloop.Loop lives in uvloop.loop; the standard loops in asyncio.*.
    return type(eventloop).__module__.partition(".")[0]


def install_asyncio_reactor(loop: str = "asyncio") -> str:
    """Install the asyncio reactor on a new event loop of kind `loop` (one of
    LOOPS), or exit clearly if another reactor is installed; returns the loop
    the reactor runs on.

    A reactor installed already (twistd -r asyncio, pytest-twisted) is kept
    with whatever loop it has: the caller decides whether that will do. The
    default is the standard loop, for callers other than the daemon (the
    benchmarks' bare clients) that ask for nothing.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if not isinstance(reactor, AsyncioSelectorReactor):
            raise IncompatibleReactor(
                "aggregator: gRPC (grpc.aio) needs the asyncio reactor, but "
                f"{type(reactor).__module__}.{type(reactor).__name__} is installed. "
                "Run twistd without -r/--reactor, or with -r asyncio."
            )
        # Twisted keeps its loop private; nothing public names the loop a
        # reactor was built on while it is not running.
        return _loop_name(reactor._asyncioEventloop)
    if loop not in LOOPS:
        raise ValueError(f"unknown event loop {loop!r}; known: {', '.join(LOOPS)}")
    if loop == "uvloop":
        import uvloop

        eventloop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        eventloop = asyncio.new_event_loop()
    # The reactor makes a loop it creates the current one, not one it is
    # given; code that looks the loop up before the reactor runs
    # (asyncio.get_event_loop(), as grpc.aio falls back to) must find this one.
    asyncio.set_event_loop(eventloop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(eventloop)
    return loop
