"""The aggregator-sim command line."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from aggregator.simulator.cli import Options, describe, main, make_service


def test_options_defaults_and_service():
    options = Options()
    options.parseOptions([])
    assert (options["source"], options["seed"], options["speed"], options["no-loop"]) == ("both", 1, 1.0, 0)
    options = Options()
    options.parseOptions(
        ["--source", "recorded", "--seed", "5", "--speed", "4", "--no-loop", "--binance-ws-port", "0"]
    )
    sim = make_service(options, MemoryReactorClock())
    assert (sim.source, sim.seed, sim.speed, sim.loop) == ("recorded", 5, 4.0, False)


@pytest.mark.parametrize(
    "argv", [["--source", "live"], ["--speed", "0"], ["--binance-rest-port", "70000"], ["--seed", "x"]]
)
def test_bad_options(argv):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)
    assert main(argv, out=io.StringIO()) == 2


def test_describe_gives_daemon_flags():
    urls = {
        "binance_ws_url": "ws://127.0.0.1:1",
        "binance_rest_url": "http://127.0.0.1:2",
        "bitstamp_ws_url": "ws://127.0.0.1:3",
        "bitstamp_rest_url": "http://127.0.0.1:4",
    }
    text = describe(urls)
    assert "binance_ws_url: ws://127.0.0.1:1" in text
    assert text.splitlines()[-1] == (
        "--binance-ws-url ws://127.0.0.1:1 --binance-rest-url http://127.0.0.1:2 "
        "--bitstamp-ws-url ws://127.0.0.1:3 --bitstamp-rest-url http://127.0.0.1:4"
    )


def test_runs_until_sigint():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.simulator.cli", "--source", "synthetic", "--speed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 10
        lines = []
        while not lines or not lines[-1].startswith("--binance-ws-url"):
            assert time.monotonic() < deadline
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, proc.stderr.read()  # type: ignore[union-attr]
            lines.append(line.strip())
        assert lines[0].startswith("binance_ws_url: ws://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_scale_and_fault_options():
    options = Options()
    options.parseOptions(
        ["--source", "scale", "--symbols", "50", "--rate", "2000", "--bitstamp-rate", "100", "--tick", "0.002",
         "--faults", "random", "--fault-interval", "2", "--weight-limit", "1200", "--ban-seconds", "30"]
    )
    clock = MemoryReactorClock()
    sim = make_service(options, clock)
    assert sim.source == "scale" and len(sim.symbols("binance")) == 50
    stats = sim.scale_stats()
    assert (stats["binance"]["rate"], stats["bitstamp"]["rate"], stats["tick"]) == (2000.0, 100.0, 0.002)
    sim.startService()
    clock.advance(2.0)
    assert len(sim.faults_injected) == 1
    sim.stopService()
    options = Options()
    options.parseOptions(["--faults", "stall,drop"])
    assert make_service(options, MemoryReactorClock()).source == "both"


@pytest.mark.parametrize(
    "argv",
    [["--symbols", "0"], ["--rate", "0"], ["--faults", "meteor"], ["--fault-interval", "0"], ["--weight-limit", "0"]],
)
def test_bad_scale_and_fault_options(argv):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)
