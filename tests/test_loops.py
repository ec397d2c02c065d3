"""--loop: the daemon on uvloop and on the standard loop.

The in-process suite runs on one loop (conftest.py: uvloop, or
AGGREGATOR_TEST_LOOP=asyncio); here the modules that depend most on the loop
(grpc.aio serving and shutdown, the websocket protocol, whole daemons) run
again on the other, and the real daemon runs on each.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.python import usage

from aggregator.reactor import LOOPS, default_loop
from tests.e2e import plugin
from tests.test_twistd import first_merged_summary, free_port, stop, twistd

ROOT = Path(__file__).resolve().parent.parent
SELECTED = os.environ.get("AGGREGATOR_TEST_LOOP") or default_loop()[0]
OTHER = next(loop for loop in LOOPS if loop != SELECTED)
# The loop-sensitive modules, run again on OTHER (about 20 s here): grpc.aio
# serving and shutdown, Autobahn's client and server, whole daemons in
# process, and a child process's end (SIGCHLD: uvloop owns the signal wake-up
# fd while it runs). The real twistd runs on each loop below.
LOOP_SENSITIVE = [
    "tests/test_end_to_end.py",
    "tests/test_grpc_service.py",
    "tests/test_feed_protocol.py",
    "tests/test_web_view.py",
    "tests/test_ops_client.py",
]


def loop_of(eventloop):
    return type(eventloop).__module__.partition(".")[0]


@pytest_twisted.ensureDeferred
async def test_the_in_process_suite_runs_on_the_selected_loop():
    assert loop_of(reactor._asyncioEventloop) == SELECTED
    # What grpc.aio and Deferred.asFuture find while the reactor runs.
    assert asyncio.get_running_loop() is reactor._asyncioEventloop


@pytest_twisted.ensureDeferred
async def test_a_child_that_exits_after_closing_its_pipes_is_reaped():
    # Its end is known only from SIGCHLD, which uvloop takes over while it
    # runs (conftest.py hands it back to the reactor).
    ended = Deferred()

    class Child(protocol.ProcessProtocol):
        def processEnded(self, reason):
            ended.callback(reason.value.exitCode)

    code = "import os, time; [os.close(fd) for fd in (0, 1, 2)]; time.sleep(0.5); os._exit(3)"
    reactor.spawnProcess(Child(), sys.executable, [sys.executable, "-c", code], env=os.environ)
    assert await ended.addTimeout(10, reactor) == 3


def test_importing_the_plugin_module_leaves_the_reactor_to_the_options():
    # twistd imports aggregator.tap before parsing its options: had anything it
    # imports installed a reactor, --loop could no longer choose the loop.
    code = ("import sys, aggregator.tap; "
            "sys.exit('twisted.internet.reactor' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_an_unknown_loop_is_a_usage_error():
    with pytest.raises(usage.UsageError, match="--loop must be one of uvloop, asyncio, got 'bogus'"):
        plugin().options().parseOptions(["--loop", "bogus"])


def test_a_loop_other_than_the_running_reactors_is_refused_by_name_only():
    with pytest.raises(usage.UsageError, match=f"--loop {OTHER}: the reactor already runs on {SELECTED}"):
        plugin().options().parseOptions(["--loop", OTHER])
    # Named as it is, or not named: the running one is used.
    for args in (["--loop", SELECTED], []):
        options = plugin().options()
        options.parseOptions(args)
        assert options["loop"] == SELECTED


def test_twistd_r_asyncio_with_another_loop_named_is_refused(tmp_path):
    # -r asyncio installs the reactor on the standard loop before our options.
    process = twistd("-n", "--pidfile=", "-r", "asyncio", "aggregator", "--loop", "uvloop",
                     cwd=tmp_path)
    try:
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            stop(process)
    assert "--loop uvloop: the reactor already runs on asyncio" in process.stdout.read()


def test_the_loop_sensitive_modules_pass_on_the_other_loop():
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *LOOP_SENSITIVE],
        cwd=ROOT, env=dict(os.environ, AGGREGATOR_TEST_LOOP=OTHER),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout
    assert " passed" in result.stdout and time.monotonic() - started < 180


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("loop", LOOPS)
def test_the_real_daemon_serves_and_stops_cleanly_on(loop, sig, tmp_path):
    port = free_port()
    process = twistd("-n", "--pidfile=", "aggregator", "--demo", "--no-web", "--loop", loop,
                     "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    try:
        summary = first_merged_summary(f"127.0.0.1:{port}")
        assert summary.spread == summary.asks[0].price - summary.bids[0].price
    finally:
        stop(process, sig)
    output = process.stdout.read()
    # twistd re-raises the signal once shut down: the status says why it ended.
    assert process.returncode in (0, -sig), output
    assert f"event loop: {loop}" in output and "Server Shut Down." in output, output
    assert "Traceback" not in output and "Unhandled" not in output, output
