"""What a new user sees from `twistd aggregator` when something is wrong: one
line, exit status 1, in the foreground and daemonized (issue 11, section 3)."""

import socket

import pytest

from tests.test_twistd import free_port, twistd

HINT = " (see twistd aggregator --help)"


def run_twistd(*args, cwd):
    process = twistd(*args, cwd=cwd)
    try:
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "abc"], "--depth must be a whole number, got 'abc'" + HINT),
        (["--demo-speed", "fast"], "--demo-speed must be a number, got 'fast'" + HINT),
        (["--bogus"], "option --bogus not recognized" + HINT),
        (["--listen", "::1:9051"],
         "--listen: an IPv6 address needs brackets: [::1]:9051, got '::1:9051'" + HINT),
        (["--depth", "0"], "--depth must be between 1 and 1000" + HINT),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key" + HINT),
    ],
)
def test_an_option_error_is_one_line_and_a_hint(tmp_path, args, message):
    assert run_twistd("-n", "--pidfile=", "aggregator", *args, cwd=tmp_path) == (
        1, f"twistd aggregator: error: {message}\n")


def test_help_still_prints_the_options(tmp_path):
    code, output = run_twistd("aggregator", "--help", cwd=tmp_path)
    assert code == 0 and "--tls-client-ca" in output and "--depth" in output


@pytest.fixture
def taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


# Exchanges on a closed loopback port: nothing leaves the machine, and a
# daemon that started by mistake still stops (see run_twistd's timeout).
OFFLINE = ["--exchanges", "binance", "--binance-ws-url", "ws://127.0.0.1:9",
           "--binance-rest-url", "http://127.0.0.1:9"]
FOREGROUND = ["-n", "--pidfile="]


def daemonized(tmp_path):
    return [f"--pidfile={tmp_path / 'aggregator.pid'}", f"--logfile={tmp_path / 'aggregator.log'}"]


@pytest.mark.parametrize("mode", ["foreground", "daemonized"])
def test_a_port_in_use_is_one_line_in_both_modes(tmp_path, taken_port, mode):
    twistd_args = FOREGROUND if mode == "foreground" else daemonized(tmp_path)
    address = f"127.0.0.1:{taken_port}"
    assert run_twistd(*twistd_args, "aggregator", "--listen", address, *OFFLINE,
                      cwd=tmp_path) == (
        1, f"twistd aggregator: error: cannot listen for gRPC on {address}: "
           "address already in use\n")
    assert not (tmp_path / "aggregator.pid").exists()


@pytest.mark.parametrize("mode", ["foreground", "daemonized"])
def test_a_metrics_port_in_use_is_one_line_in_both_modes(tmp_path, taken_port, mode):
    twistd_args = FOREGROUND if mode == "foreground" else daemonized(tmp_path)
    # A port alone binds loopback.
    assert run_twistd(*twistd_args, "aggregator", "--listen", f"127.0.0.1:{free_port()}",
                      "--metrics", str(taken_port), *OFFLINE, cwd=tmp_path) == (
        1, f"twistd aggregator: error: cannot serve metrics on 127.0.0.1:{taken_port}: "
           "address already in use\n")


def test_an_unresolvable_listen_host_is_one_line(tmp_path):
    code, output = run_twistd(*FOREGROUND, "aggregator", "--listen", "no-such-host.invalid:9051",
                              *OFFLINE, cwd=tmp_path)
    assert code == 1 and output.count("\n") == 1, output
    assert output.startswith("twistd aggregator: error: cannot listen for gRPC on "
                             "no-such-host.invalid:9051: unknown host 'no-such-host.invalid'")

