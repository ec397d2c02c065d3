"""The real `twistd aggregator` command, as an operator runs it (loopback only)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([TWISTD, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def first_merged_summary(address: str, symbol: str = "ethbtc", timeout: float = 20.0):
    """Reads the stream until a Summary shows both exchanges."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        for summary in stub.BookSummary(orderbook_pb2.Request(symbol=symbol), timeout=timeout):
            if {level.exchange for level in summary.bids} >= {"binance", "bitstamp"}:
                return summary
    raise AssertionError("stream ended")


def stop(process, sig=signal.SIGTERM, timeout=5.0) -> float:
    started = time.monotonic()
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return time.monotonic() - started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_in_the_foreground_streams_merged_book_and_stops_within_a_second(tmp_path, sig):
    port = free_port()
    process = twistd("-n", "--pidfile=", "aggregator", "--demo", "--listen", f"127.0.0.1:{port}",
                     cwd=tmp_path)
    try:
        summary = first_merged_summary(f"127.0.0.1:{port}")
        assert summary.spread == summary.asks[0].price - summary.bids[0].price
    finally:
        elapsed = stop(process, sig)
    output = process.stdout.read()
    # twistd re-raises the signal once shut down, so the status tells why it exited.
    assert process.returncode in (0, -sig), output
    assert "Server Shut Down." in output, output
    assert elapsed < 1.5, output
    assert "Traceback" not in output, output


def test_daemonized_with_pidfile_and_logfile(tmp_path):
    port = free_port()
    pidfile, logfile = tmp_path / "aggregator.pid", tmp_path / "aggregator.log"
    launcher = twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "aggregator", "--demo",
                      "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    assert launcher.wait(timeout=20) == 0, launcher.stdout.read()
    pid = int(pidfile.read_text())
    try:
        first_merged_summary(f"127.0.0.1:{port}")
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "gRPC listening on 127.0.0.1:" in log and "Traceback" not in log, log


def test_port_in_use_is_a_clear_startup_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = twistd("-n", "--pidfile=", "aggregator", "--demo", "--listen",
                         f"127.0.0.1:{port}", cwd=tmp_path)
        try:
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                stop(process)
    output = process.stdout.read()
    assert process.returncode != 0
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in output


def test_another_reactor_is_refused_clearly(tmp_path):
    process = twistd("-n", "-r", "poll", "aggregator", "--demo", cwd=tmp_path)
    assert process.wait(timeout=20) != 0
    assert "needs the asyncio reactor" in process.stdout.read()


def test_help_documents_every_option_with_defaults(tmp_path):
    process = twistd("aggregator", "--help", cwd=tmp_path)
    assert process.wait(timeout=20) == 0
    text = process.stdout.read()
    for option in ["--listen", "[::1]:9051", "--exchanges", "binance,bitstamp", "--depth", "--symbols",
                   "--binance-ws-url", "wss://stream.binance.com:9443", "--binance-rest-url",
                   "https://api.binance.com", "--bitstamp-ws-url", "wss://ws.bitstamp.net",
                   "--bitstamp-rest-url", "https://www.bitstamp.net", "--demo"]:
        assert option in text
