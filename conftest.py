"""The in-process tests' event loop: uvloop (the daemon's default), or the
standard one with AGGREGATOR_TEST_LOOP=asyncio (tests/test_loops.py runs the
loop-sensitive modules on the other one)."""

import os
import signal

import pytest

from aggregator.reactor import default_loop, install_asyncio_reactor

TEST_LOOP = os.environ.get("AGGREGATOR_TEST_LOOP") or default_loop()[0]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-twisted's own pytest_configure installs the asyncio
    # reactor on a standard loop: it keeps an asyncio reactor found installed.
    if config.getoption("reactor", None) == "asyncio":
        if install_asyncio_reactor(TEST_LOOP) == "uvloop":
            from twisted.internet import reactor

            reactor.callWhenRunning(_reap_children_on_sigchld)


def _reap_children_on_sigchld():
    """uvloop points the signal wake-up fd at its own pipe while it runs, so
    Twisted's SIGCHLD waker never fires: a reactor.spawnProcess child that
    exits just after closing its pipes is never reaped and its processEnded
    never comes (seen as tests/test_ops_client.py hanging under load). The
    daemon spawns no processes; tests do. A Python SIGCHLD handler still runs
    (uvloop wakes up for it), after Twisted installed its own (this runs once
    the reactor started): reap on the reactor, not inside the handler."""
    from twisted.internet import reactor
    from twisted.internet.process import reapAllProcesses

    signal.signal(signal.SIGCHLD, lambda signum, frame: reactor.callFromThread(reapAllProcesses))
