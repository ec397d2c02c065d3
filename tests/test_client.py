"""Tests for ``aggregator-client``: pure formatters, then the real CLI over loopback gRPC."""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from aggregator import __version__
from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.client import (
    RECONNECT_INITIAL,
    RECONNECT_MAX,
    align_numbers,
    format_json,
    format_number,
    format_spread,
    format_table,
    main,
    reconnect_delay,
    state_name,
)

Level = orderbook_pb2.Level
Summary = orderbook_pb2.Summary
ExchangeState = orderbook_pb2.ExchangeState
NOW = datetime.datetime(2024, 5, 1, 12, 34, 56)
REPO = Path(__file__).resolve().parent.parent


def summary(spread: float, bids: list[tuple[str, float, float]], asks: list[tuple[str, float, float]]) -> Summary:
    return Summary(
        spread=spread,
        bids=[Level(exchange=e, price=p, amount=a) for e, p, a in bids],
        asks=[Level(exchange=e, price=p, amount=a) for e, p, a in asks],
    )


BOOK = summary(
    0.0341 - 0.0340,  # float noise on purpose, as the daemon computes it
    bids=[("binance", 0.034, 12.5), ("bitstamp", 0.03399, 0.25), ("binance", 0.0339, 3.0)],
    asks=[("bitstamp", 0.0341, 1.0), ("binance", 0.03415, 40.125)],
)


# --------------------------------------------------------------------------
# Pure formatters
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (1e-05, "0.00001"),
        (1.5e-07, "0.00000015"),
        (0.0342, "0.0342"),
        (100.0, "100.0"),
        (1e22, "10000000000000000000000"),
        (math.nan, "nan"),
    ],
)
def test_format_number_is_shortest_and_fixed(value: float, text: str) -> None:
    assert format_number(value) == text


def test_align_numbers_pads_to_common_decimals() -> None:
    assert align_numbers([0.034, 0.03399, 12.5, 1e-05]) == ["0.03400", "0.03399", "12.50000", "0.00001"]
    assert align_numbers([]) == []
    # Padding is textual: no float noise from re-rounding to many places.
    assert align_numbers([12345678.9, 1e-08]) == ["12345678.90000000", "0.00000001"]


def test_format_spread() -> None:
    assert format_spread(math.nan) == "n/a (one side empty)"
    assert format_spread(0.0341 - 0.0340, 4) == "0.0001"
    assert format_spread(-0.0002, 5) == "-0.00020 CROSSED"
    assert format_spread(-0.0, 3) == "0.000"
    assert format_spread(2e-05) == "0.00002"


def test_table_keeps_order_and_aligns_columns() -> None:
    text = format_table(BOOK, "ethbtc", 7, NOW)
    lines = text.splitlines()
    assert lines[0] == "ethbtc  spread: 0.00010  update #7  12:34:56"
    bid_rows, ask_rows = zip(*(line.split(" |") for line in lines[4:]))
    # Best first, in the order the daemon sent them.
    assert [r.split()[2] for r in bid_rows] == ["0.03400", "0.03399", "0.03390"]
    assert [r.split()[0] for r in ask_rows if r] == ["0.03410", "0.03415"]
    assert [r.split()[0] for r in bid_rows] == ["binance", "bitstamp", "binance"]
    assert [r.split()[2] for r in ask_rows if r] == ["bitstamp", "binance"]
    # Right-justified with equal decimals: the decimal points share a column.
    assert len({row.index(".") for row in bid_rows}) == 1
    assert len({row.rindex(".") for row in bid_rows}) == 1
    assert len({row.index(".") for row in ask_rows if row}) == 1
    assert len({line.index(" |") for line in lines[2:]}) == 1
    assert "e-" not in text


def test_table_small_prices_not_scientific() -> None:
    book = summary(1e-08, [("binance", 1e-05, 1000000.0)], [("bitstamp", 1.001e-05, 5e-05)])
    text = format_table(book, "shibusd", 1, NOW)
    assert "0.00001000" in text and "0.00001001" in text and "0.00005" in text
    assert "spread: 0.00000001 " in text
    assert "e-" not in text and "E-" not in text


def test_table_crossed() -> None:
    book = summary(-0.0001, [("binance", 0.0342, 1.0)], [("bitstamp", 0.0341, 2.0)])
    assert "spread: -0.0001 CROSSED" in format_table(book, "ethbtc", 1, NOW).splitlines()[0]


def test_table_empty_sides() -> None:
    only_bids = format_table(summary(math.nan, [("binance", 0.034, 1.0)], []), "ethbtc", 1, NOW)
    assert "spread: n/a (one side empty)" in only_bids
    assert only_bids.splitlines()[-1].rstrip().endswith("0.034 |")

    only_asks = format_table(summary(math.nan, [], [("bitstamp", 0.035, 2.0)]), "ethbtc", 1, NOW)
    last = only_asks.splitlines()[-1]
    assert last.split(" | ")[0].strip() == "" and "bitstamp" in last

    empty = format_table(Summary(spread=math.nan), "ethbtc", 1, NOW)
    assert len(empty.splitlines()) == 4  # header, blank, two title lines, no rows


def test_json_line() -> None:
    line = format_json(BOOK, "ethbtc")
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["symbol"] == "ethbtc"
    assert obj["spread"] == pytest.approx(0.0001)
    assert [b["price"] for b in obj["bids"]] == [0.034, 0.03399, 0.0339]
    assert obj["asks"][1] == {"exchange": "binance", "price": 0.03415, "amount": 40.125}


def test_json_nan_spread_is_null() -> None:
    line = format_json(summary(math.nan, [], [("bitstamp", 1e-05, 2.0)]), "x")
    assert json.loads(line) == {
        "symbol": "x",
        "spread": None,
        "bids": [],
        "asks": [{"exchange": "bitstamp", "price": 1e-05, "amount": 2.0}],
        "exchanges": [],
        "timestamp_us": None,
    }
    assert "NaN" not in line


def with_states(book: Summary, timestamp: datetime.datetime) -> Summary:
    states = Summary(
        exchanges=[
            ExchangeState(exchange="binance", state=ExchangeState.LIVE, reason="in sync"),
            ExchangeState(exchange="bitstamp", state=ExchangeState.STALE, reason="disconnected: lost"),
        ],
        timestamp_us=int(timestamp.timestamp() * 1_000_000),
    )
    combined = Summary()
    combined.CopyFrom(book)
    combined.MergeFrom(states)
    return combined


def test_table_shows_exchange_states_and_update_age() -> None:
    book = with_states(BOOK, NOW - datetime.timedelta(milliseconds=12))
    lines = format_table(book, "ethbtc", 7, NOW).splitlines()
    assert lines[0] == "ethbtc  spread: 0.00010  update #7  12:34:56  age 12 ms"
    # The reason only where it explains a missing exchange.
    assert lines[1] == "binance live  bitstamp stale (disconnected: lost)"
    assert lines[2] == ""
    old = with_states(BOOK, NOW - datetime.timedelta(seconds=75))
    assert format_table(old, "ethbtc", 1, NOW).splitlines()[0].endswith("age 75.0 s")


def test_json_has_exchange_states_and_timestamp() -> None:
    book = with_states(BOOK, NOW)
    obj = json.loads(format_json(book, "ethbtc"))
    assert obj["exchanges"] == [
        {"exchange": "binance", "state": "live", "reason": "in sync"},
        {"exchange": "bitstamp", "state": "stale", "reason": "disconnected: lost"},
    ]
    assert obj["timestamp_us"] == int(NOW.timestamp() * 1_000_000)


def test_state_names_of_unknown_states() -> None:
    assert [state_name(s) for s in (0, 1, 2, 3, 99)] == ["unknown", "syncing", "live", "stale", "unknown"]


def test_reconnect_delay_doubles_to_a_cap_with_jitter() -> None:
    assert [reconnect_delay(n, jitter=lambda: 0.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert reconnect_delay(0, jitter=lambda: 1.0) == RECONNECT_INITIAL / 2
    assert reconnect_delay(50, jitter=lambda: 0.999) > RECONNECT_MAX / 2


# --------------------------------------------------------------------------
# The CLI against a real gRPC server on loopback
# --------------------------------------------------------------------------

STREAM = [
    summary(0.0001, [("binance", 0.034, 1.5)], [("bitstamp", 0.0341, 2.0)]),
    summary(math.nan, [("binance", 0.03405, 1.5)], []),
    summary(-0.00002, [("bitstamp", 0.03412, 0.5)], [("binance", 0.0341, 3.0)]),
]

ABORTS = {
    "nosuch": (grpc.StatusCode.NOT_FOUND, "unknown symbol 'nosuch'"),
    "": (grpc.StatusCode.INVALID_ARGUMENT, "symbol is required"),
    "busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscriptions"),
    "down": (grpc.StatusCode.UNAVAILABLE, "shutting down"),
    "boom": (grpc.StatusCode.INTERNAL, "kaboom"),
}


class FakeAggregator(orderbook_pb2_grpc.AggregatorServicer):
    def BookSummary(self, request: orderbook_pb2.Request, context: grpc.ServicerContext) -> Iterator[Summary]:
        if request.symbol == "echo":
            # Says what the client asked for, in the reason of a fake exchange state.
            asked = f"{','.join(request.exchanges)}/{request.depth}"
            yield Summary(exchanges=[orderbook_pb2.ExchangeState(exchange="x", reason=asked)])
            return
        if request.symbol in ABORTS:
            context.abort(*ABORTS[request.symbol])
        if request.symbol == "flaky":
            # One update, then the connection "breaks".
            yield STREAM[0]
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if request.symbol == "forever":
            # Streams until the client goes away (or the server stops).
            while context.is_active():
                yield STREAM[0]
                time.sleep(0.02)
            return
        yield from STREAM


@pytest.fixture(scope="module")
def addr() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    orderbook_pb2_grpc.add_AggregatorServicer_to_server(FakeAggregator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_json_stream(addr: str) -> None:
    code, out, err = run("ethbtc", "--addr", addr, "--json", "--count", "3")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"symbol": "ethbtc", "spread": 0.0001,
         "bids": [{"exchange": "binance", "price": 0.034, "amount": 1.5}],
         "asks": [{"exchange": "bitstamp", "price": 0.0341, "amount": 2.0}],
         "exchanges": [], "timestamp_us": None},
        {"symbol": "ethbtc", "spread": None,
         "bids": [{"exchange": "binance", "price": 0.03405, "amount": 1.5}],
         "asks": [], "exchanges": [], "timestamp_us": None},
        {"symbol": "ethbtc", "spread": -2e-05,
         "bids": [{"exchange": "bitstamp", "price": 0.03412, "amount": 0.5}],
         "asks": [{"exchange": "binance", "price": 0.0341, "amount": 3.0}],
         "exchanges": [], "timestamp_us": None},
    ]


def test_exchanges_and_depth_are_sent_with_the_request(addr: str) -> None:
    code, out, _ = run("echo", "--addr", addr, "--json", "--count", "1",
                       "--exchanges", "Binance, kraken", "--depth", "5")
    assert code == 0
    assert json.loads(out)["exchanges"][0]["reason"] == "binance,kraken/5"
    code, out, _ = run("echo", "--addr", addr, "--json", "--count", "1")
    assert json.loads(out)["exchanges"][0]["reason"] == "/0"  # the daemon's defaults


def test_count_stops_early(addr: str) -> None:
    code, out, _ = run("ethbtc", "--addr", addr, "--json", "--count", "1")
    assert code == 0 and len(out.splitlines()) == 1


def test_table_not_a_tty(addr: str) -> None:
    code, out, err = run("ethbtc", "--addr", addr, "--count", "3")
    assert (code, err) == (0, "")
    assert "\x1b" not in out
    tables = out.split("\n\n" + "ethbtc")
    assert len(tables) == 3
    for price in ("0.0340", "0.0341", "0.03405", "0.03412"):
        assert price in out
    assert "n/a (one side empty)" in tables[1]
    assert "CROSSED" in tables[2]


def test_table_redraws_on_a_tty(addr: str) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    assert main(["ethbtc", "--addr", addr, "--count", "2"], stdout=out, stderr=io.StringIO()) == 0
    frames = out.getvalue().split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 3
    assert "update #2" in frames[2]


def test_env_defaults(addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_ADDR", addr)
    monkeypatch.setenv("SYMBOL", "nosuch")
    assert run("--count", "1")[2] == "aggregator-client: nosuch: unknown symbol 'nosuch'\n"
    assert run("ethbtc", "--json", "--count", "1")[0] == 0


@pytest.mark.parametrize(
    "symbol, code, message",
    [
        ("nosuch", 3, "aggregator-client: nosuch: unknown symbol 'nosuch'\n"),
        ("", 3, "aggregator-client: : symbol is required\n"),
        ("busy", 3, "aggregator-client: busy: too many subscriptions\n"),
        ("down", 4, "aggregator-client: the daemon at {addr} is not ready: shutting down\n"),
        ("boom", 1, "aggregator-client: INTERNAL: kaboom\n"),
    ],
)
def test_rpc_errors(addr: str, symbol: str, code: int, message: str) -> None:
    assert run(symbol, "--addr", addr, "--json") == (code, "", message.format(addr=addr))


def test_stream_ended_by_server_without_reconnect(addr: str) -> None:
    code, out, err = run("ethbtc", "--addr", addr, "--json", "--count", "5", "--no-reconnect")
    assert len(out.splitlines()) == 3
    assert (code, err) == (1, "aggregator-client: the daemon ended the stream\n")


def test_stream_ended_by_server_is_reopened(addr: str) -> None:
    code, out, err = run("ethbtc", "--addr", addr, "--json", "--count", "5")
    assert code == 0 and len(out.splitlines()) == 5
    notice, reconnected = err.splitlines()
    assert notice.startswith("aggregator-client: the daemon ended the stream; reconnecting in ")
    assert reconnected == "aggregator-client: reconnected"


def test_broken_stream_is_reopened_with_growing_delays(addr: str) -> None:
    started = time.monotonic()
    code, out, err = run("flaky", "--addr", addr, "--json", "--count", "3")
    assert code == 0 and len(out.splitlines()) == 3
    notices = [line for line in err.splitlines() if "reconnecting" in line]
    assert len(notices) == 2
    assert all("UNAVAILABLE: connection reset" in line for line in notices)
    # Each update resets the backoff: both waits are the first one's.
    assert time.monotonic() - started < 2 * RECONNECT_INITIAL + 2


def test_errors_before_any_update_are_not_retried(addr: str) -> None:
    # The daemon refused the very first stream: misconfiguration, not a restart.
    assert run("down", "--addr", addr)[0] == 4
    assert run("busy", "--addr", addr)[0] == 3


def test_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    code, out, err = run("ethbtc", "--addr", f"127.0.0.1:{port}", "--timeout", "1")
    assert time.monotonic() - started < 4
    assert (code, out) == (2, "")
    assert err == f"aggregator-client: cannot reach the daemon at 127.0.0.1:{port} (Connection refused)\n"


def test_version_and_bad_arguments() -> None:
    assert run("--version") == (0, f"aggregator-client {__version__}\n", "")
    assert run("--count", "0") == (
        1, "", "aggregator-client: error: --count: must be at least 1, not 0 "
        "(see aggregator-client --help)\n")


# --------------------------------------------------------------------------
# As a real process: the ways a user stops it must not print a traceback
# --------------------------------------------------------------------------


def spawn(addr: str, *argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator.client", "forever", "--addr", addr, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def test_ctrl_c_exits_130_quietly(addr: str) -> None:
    with spawn(addr, "--json") as proc:
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["symbol"] == "forever"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=5)
        finally:
            proc.kill()  # no-op once it has exited; bounds the test otherwise
    assert (proc.returncode, err) == (130, "")


def test_closed_pipe_exits_quietly(addr: str) -> None:
    with spawn(addr, "--json") as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.readline()
            proc.stdout.close()  # like `| head -1`
            proc.wait(timeout=5)
            err = proc.stderr.read()
        finally:
            proc.kill()
    assert (proc.returncode, err) == (141, "")
