"""aggregator-client as a new user meets it (issue 11, section 3): notices
and a ticking age inside the redrawn table, steady columns, plain option
errors, the API definition at hand."""

from __future__ import annotations

import argparse
import datetime
import io
import re
import time
from pathlib import Path

import pytest

from aggregator import client
from aggregator._proto import orderbook_pb2
from aggregator.client import column_widths, format_table, main

REPO = Path(__file__).resolve().parent.parent
NOW = datetime.datetime(2024, 5, 1, 12, 34, 56)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def book(amount: float, timestamp_us: int = 0) -> orderbook_pb2.Summary:
    level = orderbook_pb2.Level
    return orderbook_pb2.Summary(
        spread=0.0001,
        bids=[level(exchange="binance", price=0.034, amount=amount)],
        asks=[level(exchange="bitstamp", price=0.0341, amount=1.0)],
        timestamp_us=timestamp_us,
    )


def screen(out, err=None, **args):
    namespace = argparse.Namespace(json=False, symbol="ethbtc", **args)
    return client._Screen(namespace, out, err if err is not None else io.StringIO())


def frames(out: io.StringIO) -> list[str]:
    return out.getvalue().split("\x1b[H\x1b[2J")[1:]


def test_columns_stay_in_place_when_the_numbers_get_shorter():
    wide, narrow = book(12345.125), book(1.5)
    widths = tuple(map(max, zip(column_widths(wide), column_widths(narrow))))
    first, second = (format_table(s, "ethbtc", 1, NOW, widths) for s in (wide, narrow))
    column_of = lambda table: [line.index("|") for line in table.splitlines() if "|" in line]
    assert column_of(first) == column_of(second)
    # Without the kept widths they would move.
    assert column_of(format_table(narrow, "ethbtc", 1, NOW)) != column_of(first)


def test_on_a_terminal_columns_only_grow():
    out = Tty()
    view = screen(out)
    for amount in (12345.125, 1.5):
        view.show(book(amount))
    first, second = frames(out)
    assert first.index("|") == second.index("|")


def test_on_a_terminal_notices_are_shown_in_the_table():
    out, err = Tty(), Tty()
    view = screen(out, err)
    view.show(book(1.5))
    view.notify("the daemon ended the stream; reconnecting in 0.5 s")
    view.notify("reconnected")
    # Shown in the redrawn table, not on stderr where the next redraw would wipe it.
    assert err.getvalue() == ""
    assert re.search(r"\d\d:\d\d:\d\d reconnected\n", frames(out)[-1])
    view.show(book(2.5))
    assert "reconnected" in frames(out)[-1]


def test_notices_go_to_stderr_when_not_on_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    view = screen(out, err)
    view.show(book(1.5))
    view.notify("reconnected")
    assert err.getvalue() == "aggregator-client: reconnected\n"
    assert "reconnected" not in out.getvalue()


def test_on_a_terminal_the_age_keeps_counting_without_updates(monkeypatch):
    monkeypatch.setattr(client, "_TICK", 0.05)
    out = Tty()
    view = screen(out)
    view.show(book(1.5, timestamp_us=int(time.time() * 1e6)))
    view.run_ticker()
    deadline = time.monotonic() + 5
    while len(frames(out)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    view.stop()
    ages = [int(re.search(r"age (\d+) ms", frame).group(1)) for frame in frames(out)[:4]]
    assert len(ages) == 4 and ages == sorted(ages) and ages[-1] >= ages[0] + 100


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "abc"], "--count: expected a whole number, got 'abc'"),
        (["--count", "0"], "--count: must be at least 1, not 0"),
        (["--timeout", "soon"], "--timeout: expected a number of seconds, got 'soon'"),
        (["--addr", "::1:9051"],
         "--addr: an IPv6 address needs brackets: [::1]:9051, got '::1:9051'"),
        (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_option_errors_are_one_line_and_a_hint(argv, message):
    started = time.monotonic()
    assert run(*argv) == (
        1, "", f"aggregator-client: error: {message} (see aggregator-client --help)\n")
    assert time.monotonic() - started < 1  # no connection attempted


def test_proto_prints_the_api_definition():
    assert run("--proto") == (0, (REPO / "proto" / "orderbook.proto").read_text(), "")
