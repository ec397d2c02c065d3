"""`--web`: off by default, on with --demo, a port alone is loopback, a port in
use is one line at start, beyond loopback is warned about (issue 11, sections 2 and 4)."""

import pytest
from twisted.python import usage
from twisted.test.proto_helpers import MemoryReactor

from aggregator.tap import Options, StartupError
from aggregator.web import WebServer
from tests.test_twistd import free_port
from tests.test_ux_daemon import FOREGROUND, OFFLINE, run_twistd, taken_port  # noqa: F401 (fixture)
from tests.test_ux_grpc import events, warnings  # noqa: F401 (fixture)
from tests.test_web_view import FakeSource


def parsed(*args):
    options = Options()
    options.parseOptions(list(args))
    return options["web"]


@pytest.mark.parametrize("args, web", [
    ((), ""),
    (("--demo",), "127.0.0.1:9080"),
    (("--demo", "--no-web"), ""),
    (("--demo", "--web", ""), ""),  # empty: off, as --metrics
    (("--demo", "--web", "127.0.0.1:9999"), "127.0.0.1:9999"),
    (("--web", "9090"), "127.0.0.1:9090"),
    (("--web", "[::1]:9090"), "[::1]:9090"),
    (("--web", "0.0.0.0:9090"), "0.0.0.0:9090"),
])
def test_where_the_live_view_listens(args, web):
    assert parsed(*args) == web


@pytest.mark.parametrize("value", ["abc", "::1:9090", "127.0.0.1:70000"])
def test_a_bad_web_address_is_refused(value):
    with pytest.raises(usage.UsageError, match="--web: "):
        parsed("--web", value)


def test_a_web_port_in_use_is_one_line(tmp_path, taken_port):  # noqa: F811
    assert run_twistd(*FOREGROUND, "aggregator", "--listen", f"127.0.0.1:{free_port()}",
                      "--web", str(taken_port), *OFFLINE, cwd=tmp_path) == (
        1, f"twistd aggregator: error: cannot serve the live view on 127.0.0.1:{taken_port}: "
           "address already in use\n")


def test_the_live_view_beyond_loopback_is_warned_about(events):  # noqa: F811
    for listen in ("127.0.0.1:9080", "[::1]:9080", "0.0.0.0:9080", "[::]:9080"):
        server = WebServer(listen, FakeSource(), default_symbol="ethbtc", max_clients=1,
                           max_symbols=1, reactor=MemoryReactor())
        server.startService()
        server.stopService()
    assert [e["listen"] for e in warnings(events, "reachable beyond this machine")] == [
        "0.0.0.0:9080", "[::]:9080"]
    assert len([e for e in events if e.get("log_format") == "live view at {url}"]) == 4


def checked_ports(taken, *args):
    options = Options()
    options.parseOptions(["--listen", f"127.0.0.1:{free_port()}", *args])
    options["web"] = f"127.0.0.1:{taken}"  # as if --demo's 127.0.0.1:9080 were taken
    options._check_ports()  # what twistd runs (Options built here have no parent)
    return options["web"]


def test_the_demos_own_port_taken_is_a_warning_and_no_live_view(taken_port, capsys):  # noqa: F811
    assert checked_ports(taken_port, "--demo") == ""
    assert capsys.readouterr().err == (
        f"twistd aggregator: warning: cannot serve the live view on 127.0.0.1:{taken_port}: "
        "address already in use; live view off (--web picks another address)\n")


def test_a_port_asked_for_and_taken_stays_an_error(taken_port):  # noqa: F811
    with pytest.raises(StartupError, match="cannot serve the live view on"):
        checked_ports(taken_port, "--demo", "--web", "9080")
