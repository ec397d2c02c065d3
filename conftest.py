"""The in-process tests' event loop: uvloop (the daemon's default), or the
standard one with AGGREGATOR_TEST_LOOP=asyncio (tests/test_loops.py runs the
loop-sensitive modules on the other one)."""

import os

import pytest

from aggregator.reactor import default_loop, install_asyncio_reactor

TEST_LOOP = os.environ.get("AGGREGATOR_TEST_LOOP") or default_loop()[0]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-twisted's own pytest_configure installs the asyncio
    # reactor on a standard loop: it keeps an asyncio reactor found installed.
    if config.getoption("reactor", None) == "asyncio":
        install_asyncio_reactor(TEST_LOOP)
