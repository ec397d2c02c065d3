"""JSON log lines (--log-format=json) where twistd logs: stdout in the
foreground, --logfile when daemonized."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from aggregator import jsonlog
from tests.ops import free_port

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def event(**fields):
    return {
        "log_time": 1_700_000_000.25,
        "log_level": LogLevel.info,
        "log_namespace": "aggregator.merger.ExchangeBook",
        "log_format": "{exchange} {symbol}: {old} -> {new} ({reason})",
        "log_source": object(),
        **fields,
    }


def test_json_line_has_the_message_and_the_fields():
    line = jsonlog.json_line(event(exchange="binance", symbol="ethbtc", old="syncing", new="live",
                                   reason="in sync"))
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250000+00:00",
        "level": "info",
        "namespace": "aggregator.merger.ExchangeBook",
        "message": "binance ethbtc: syncing -> live (in sync)",
        "exchange": "binance", "symbol": "ethbtc", "old": "syncing", "new": "live", "reason": "in sync",
    }


def test_json_line_with_a_traceback_and_unserializable_fields():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    record = json.loads(jsonlog.json_line(
        event(log_format="cannot handle {message!r}", log_failure=failure, message=b"{}",
              error=ValueError("bad"), log_level=LogLevel.critical)))
    assert record["level"] == "critical"
    assert record["message"] == formatEvent(event(log_format="cannot handle {message!r}", message=b"{}"))
    assert "ZeroDivisionError" in record["traceback"]
    assert record["error"] == "bad"


@pytest.mark.parametrize("twistd, destination", [
    ({"nodaemon": True, "logfile": None}, None),
    ({"nodaemon": True, "logfile": "-"}, None),
    ({"nodaemon": True, "logfile": "a.log"}, "a.log"),
    ({"nodaemon": False, "logfile": None}, "twistd.log"),
    ({"nodaemon": False, "logfile": "/var/log/a.log"}, "/var/log/a.log"),
])
def test_json_goes_where_twistd_would_log(twistd, destination, monkeypatch):
    monkeypatch.setattr(jsonlog, "_destination", "unset")
    options = {"logger": None, "syslog": False, **twistd}
    jsonlog.use_json_log(options)
    assert options["logger"] == "aggregator.jsonlog.twistd_observer"
    assert jsonlog._destination == destination


@pytest.mark.parametrize("twistd, message", [
    ({"logger": "x.y"}, "drop --logger/--syslog"),
    ({"syslog": True}, "drop --logger/--syslog"),
    ({"logfile": "-", "nodaemon": False}, "a daemon cannot log to stdout"),
])
def test_json_log_conflicts(twistd, message):
    with pytest.raises(ValueError, match=message):
        jsonlog.use_json_log(twistd)


def twistd(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([TWISTD, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_foreground_daemon_logs_json_lines_on_stdout(tmp_path):
    process = twistd("-n", "--pidfile=", "aggregator", "--demo", "--listen",
                     f"127.0.0.1:{free_port()}", "--log-format", "json", cwd=tmp_path)
    try:
        lines = []
        # Up and running (the reactor handles SIGTERM from then on).
        while not any("SERVING (up: " in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=10)
    records = [json.loads(line) for line in lines + rest.splitlines()]
    listening = next(r for r in records if r["message"].startswith("gRPC listening"))
    assert listening["namespace"] == "aggregator.grpc_service.GrpcServer"
    assert listening["security"] == "plaintext"
    assert records[-1]["message"] == "Server Shut Down."


def test_daemonized_logs_json_lines_to_the_logfile(tmp_path):
    pidfile, logfile = tmp_path / "aggregator.pid", tmp_path / "aggregator.json"
    launcher = twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "aggregator", "--demo",
                      "--listen", f"127.0.0.1:{free_port()}", "--log-format", "json", cwd=tmp_path)
    assert launcher.wait(timeout=20) == 0, launcher.stdout.read()
    wait_for(lambda: logfile.exists() and "gRPC listening" in logfile.read_text())
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait_for(lambda: not pidfile.exists())
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert any(r["message"].startswith("health: ") for r in records)
    assert records[-1]["message"] == "Server Shut Down."
