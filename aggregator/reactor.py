"""grpc.aio runs on asyncio: the daemon needs Twisted's asyncio reactor.

Without it grpc.aio accepts connections but never serves them, and shutdown
hangs. Imported by aggregator.tap, i.e. when twistd has parsed -r (if any) and
is about to build our options, before anything else imports the reactor.
"""

from __future__ import annotations

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


def install_asyncio_reactor() -> None:
    """Install the asyncio reactor, or exit clearly if another one is installed."""
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if not isinstance(reactor, AsyncioSelectorReactor):
            raise IncompatibleReactor(
                "aggregator: gRPC (grpc.aio) needs the asyncio reactor, but "
                f"{type(reactor).__module__}.{type(reactor).__name__} is installed. "
                "Run twistd without -r/--reactor, or with -r asyncio."
            )
        return
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
