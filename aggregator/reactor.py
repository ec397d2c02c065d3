"""grpc.aio runs on asyncio: the daemon needs Twisted's asyncio reactor.

Without it grpc.aio accepts connections but never serves them, and shutdown
hangs. Imported by aggregator.tap, i.e. when twistd has parsed -r (if any) and
is about to build our options, before anything else imports the reactor.
"""

from __future__ import annotations

import sys


class IncompatibleReactor(SystemExit):
    pass


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
