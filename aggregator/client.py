"""``aggregator-client``: watch the daemon's merged top of book from a terminal.

A plain synchronous gRPC client (no Twisted, no asyncio): it is a console tool
that does one blocking thing, so a blocking iterator over the stream is the
simplest correct design. Once it has streamed, it survives daemon restarts:
a stream that ends or breaks is reopened, with backoff.

The formatters (:func:`format_table`, :func:`format_json`) are pure functions of
a ``Summary`` so they can be tested without a server; :func:`main` does the I/O.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Callable, TextIO

import grpc

from aggregator import __version__
from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc

PROG = "aggregator-client"
DEFAULT_SYMBOL = "ethbtc"
# The daemon's default listening address (as in the original Rust demo).
DEFAULT_ADDR = "[::1]:9051"
DEFAULT_TIMEOUT = 5.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_BAD_SYMBOL = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `| head`

# Statuses that say the request itself was refused: retrying the same symbol
# will not help, so they get their own exit code.
_SYMBOL_ERRORS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# After the stream worked once, these mean "the daemon is restarting or busy":
# open it again rather than exit.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 8.0

_CHANNEL_OPTIONS = [
    # Notice a dead daemon or network while the stream is quiet; the daemon
    # accepts pings every 10 s or more.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # While the daemon restarts, retry the connection every few seconds, not
    # after gRPC's default of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# Cursor home + clear screen: the next table overwrites the previous one.
_REDRAW = "\x1b[H\x1b[2J"
_COLUMN_GAP = "  "
_SIDE_SEPARATOR = " | "


# --------------------------------------------------------------------------
# Pure formatting
# --------------------------------------------------------------------------


def format_number(x: float) -> str:
    """The shortest digits that round-trip ``x`` (as ``repr``), in fixed notation.

    ``repr`` switches to scientific notation below 1e-4 (``1e-05``), which is
    common for altcoin prices and unreadable in a price column.
    """
    if not math.isfinite(x):
        return str(x)
    return format(Decimal(repr(x)), "f")


def _decimals(text: str) -> int:
    return len(text.partition(".")[2])


def _pad_decimals(text: str, decimals: int) -> str:
    """Pad with zeros to ``decimals`` places: exact, unlike re-rounding a float."""
    missing = decimals - _decimals(text)
    if missing <= 0:
        return text
    return text + ("" if "." in text else ".") + "0" * missing


def align_numbers(values: Sequence[float]) -> list[str]:
    """Format a column so that, right-justified, the decimal points line up."""
    texts = [format_number(v) for v in values]
    decimals = max((_decimals(t) for t in texts), default=0)
    return [_pad_decimals(t, decimals) for t in texts]


def format_spread(spread: float, decimals: int | None = None) -> str:
    """Human text for the spread.

    ``decimals`` is the precision of the prices it was computed from: the
    daemon subtracts two floats, so the raw value carries binary noise
    (0.0342 - 0.0341 = 0.00010000000000000286) that rounding to the prices'
    own precision removes exactly.
    """
    if math.isnan(spread):
        # The daemon's convention: NaN when either side of the book is empty.
        return "n/a (one side empty)"
    if decimals is None or not math.isfinite(spread):
        text = format_number(spread)
    else:
        text = format(spread + 0.0, f".{decimals}f")  # + 0.0 turns -0.0 into 0.0
    # Negative means the merged book is crossed: one exchange's best bid is
    # above the other's best ask. That is a real arbitrage, not an error.
    return f"{text} CROSSED" if spread < 0 else text


def state_name(state: int) -> str:
    """ExchangeState.State → "syncing", "live", "stale"; "unknown" otherwise."""
    try:
        name = orderbook_pb2.ExchangeState.State.Name(state)
    except ValueError:  # a state added after this client was built
        return "unknown"
    return "unknown" if name == "STATE_UNSPECIFIED" else name.lower()


def format_exchanges(summary: orderbook_pb2.Summary) -> str:
    """"binance live  bitstamp stale (disconnected: ...)": why one is missing."""
    parts = []
    for exchange in summary.exchanges:
        state = state_name(exchange.state)
        reason = f" ({exchange.reason})" if state != "live" and exchange.reason else ""
        parts.append(f"{exchange.exchange} {state}{reason}")
    return _COLUMN_GAP.join(parts)


def update_age(summary: orderbook_pb2.Summary, now: datetime.datetime) -> float | None:
    """Seconds since the daemon made the Summary; None if it did not say when."""
    if not summary.timestamp_us:
        return None
    return now.timestamp() - summary.timestamp_us / 1e6


def format_age(seconds: float) -> str:
    # Can be negative: the daemon's clock is not ours.
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 1 else f"{seconds:.1f} s"


def format_table(
    summary: orderbook_pb2.Summary,
    symbol: str,
    updates: int,
    now: datetime.datetime,
) -> str:
    """The Summary as a text table: bids on the left, asks on the right, best first.

    The header shows the update's age and, on a second line, each exchange's
    book state, when the daemon sends them.
    """
    bids, asks = list(summary.bids), list(summary.asks)
    # Both price columns share one precision so bid and ask read alike; the
    # same for the amounts.
    prices = align_numbers([lv.price for lv in bids + asks])
    amounts = align_numbers([lv.amount for lv in bids + asks])
    bid_prices, ask_prices = prices[: len(bids)], prices[len(bids) :]
    bid_amounts, ask_amounts = amounts[: len(bids)], amounts[len(bids) :]
    price_decimals = _decimals(prices[0]) if prices else None

    ex_w = max([len("exchange")] + [len(lv.exchange) for lv in bids + asks])
    amount_w = max([len("amount")] + [len(t) for t in amounts])
    price_w = max([len("price")] + [len(t) for t in prices])

    def bid_cells(exchange: str, amount: str, price: str) -> str:
        return _COLUMN_GAP.join(
            [exchange.ljust(ex_w), amount.rjust(amount_w), price.rjust(price_w)]
        )

    def ask_cells(price: str, amount: str, exchange: str) -> str:
        return _COLUMN_GAP.join(
            [price.rjust(price_w), amount.rjust(amount_w), exchange.ljust(ex_w)]
        )

    bid_w = len(bid_cells("", "", ""))
    header = [
        symbol,
        f"spread: {format_spread(summary.spread, price_decimals)}",
        f"update #{updates}",
        now.strftime("%H:%M:%S"),
    ]
    age = update_age(summary, now)
    if age is not None:
        header.append(f"age {format_age(age)}")
    lines = [_COLUMN_GAP.join(header)]
    if summary.exchanges:
        lines.append(format_exchanges(summary))
    lines += [
        "",
        "BIDS".rjust(bid_w) + _SIDE_SEPARATOR + "ASKS",
        bid_cells("exchange", "amount", "price")
        + _SIDE_SEPARATOR
        + ask_cells("price", "amount", "exchange"),
    ]
    for i in range(max(len(bids), len(asks))):
        left = (
            bid_cells(bids[i].exchange, bid_amounts[i], bid_prices[i])
            if i < len(bids)
            else " " * bid_w
        )
        right = (
            ask_cells(ask_prices[i], ask_amounts[i], asks[i].exchange)
            if i < len(asks)
            else ""
        )
        lines.append((left + _SIDE_SEPARATOR + right).rstrip())
    return "\n".join(lines) + "\n"


def _json_number(x: float) -> float | None:
    # JSON has no NaN; strict parsers reject Python's bare `NaN` token.
    return x if math.isfinite(x) else None


def _json_levels(levels: Sequence[orderbook_pb2.Level]) -> list[dict[str, object]]:
    return [
        {
            "exchange": lv.exchange,
            "price": _json_number(lv.price),
            "amount": _json_number(lv.amount),
        }
        for lv in levels
    ]


def format_json(summary: orderbook_pb2.Summary, symbol: str) -> str:
    """The Summary as one line of JSON (no trailing newline); NaN spread -> null.

    `exchanges` and `timestamp_us` (null if the daemon does not send it) are
    always present, so consumers see one schema.
    """
    obj = {
        "symbol": symbol,
        "spread": _json_number(summary.spread),
        "bids": _json_levels(summary.bids),
        "asks": _json_levels(summary.asks),
        "exchanges": [
            {"exchange": e.exchange, "state": state_name(e.state), "reason": e.reason}
            for e in summary.exchanges
        ],
        "timestamp_us": summary.timestamp_us or None,
    }
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------
# Command line and I/O
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Built per call so the environment defaults are read when main() runs,
    # not when the module is imported.
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stream the aggregator daemon's merged top of book.",
    )
    parser.add_argument(
        "symbol",
        nargs="?",
        default=os.environ.get("SYMBOL", DEFAULT_SYMBOL),
        metavar="SYMBOL",
        help="market to watch, e.g. ethbtc (default: $SYMBOL, else %(default)s)",
    )
    parser.add_argument(
        "--addr",
        default=os.environ.get("GRPC_ADDR", DEFAULT_ADDR),
        metavar="HOST:PORT",
        help="daemon address (default: $GRPC_ADDR, else %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per line instead of a table",
    )
    parser.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="exit after N updates (default: run until interrupted)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the daemon to accept the connection "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the stream ends or breaks instead of reopening it "
        "(by default a stream that worked is reopened, with backoff)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's root certificates",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="connect with TLS, trusting the certificates in this file "
        "(e.g. the daemon's self-signed one)",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}"
    )
    return parser


def reconnect_delay(
    attempt: int, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds before reconnection attempt `attempt` (0, 1, ...): doubling from
    RECONNECT_INITIAL up to RECONNECT_MAX, less up to a half at random so that
    the clients of a restarted daemon do not all come back at once."""
    delay = min(RECONNECT_MAX, RECONNECT_INITIAL * 2**attempt)
    return float(delay * (1 - jitter() / 2))


class _Unreachable(Exception):
    """The channel did not become ready within the timeout."""


class _StreamEnded(Exception):
    """The server closed the stream cleanly before we were done."""


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.tls_ca):
        return grpc.insecure_channel(args.addr, options=_CHANNEL_OPTIONS)
    roots = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as file:
            roots = file.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(args.addr, credentials, options=_CHANNEL_OPTIONS)


def _watch(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print Summaries until ``--count`` is reached; raise on anything else.

    The first connection must succeed within ``--timeout`` (a wrong address
    fails fast). After that, a stream that ends or breaks is reopened, with
    backoff, until it works again: the daemon is restarting.
    """
    redraw = not args.json and out.isatty()
    # Leaving the `with` closes the channel, which cancels the stream.
    with _channel(args) as channel:
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise _Unreachable from None
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        request = orderbook_pb2.Request(symbol=args.symbol)
        updates = attempt = 0
        while True:
            try:
                # Once reconnecting, wait for the daemon to be back rather
                # than fail at once while it is down.
                for summary in stub.BookSummary(request, wait_for_ready=updates > 0):
                    if attempt:
                        print(f"{PROG}: reconnected", file=err, flush=True)
                        attempt = 0
                    updates += 1
                    _show(summary, args, updates, redraw, out)
                    if updates == args.count:
                        return
                raise _StreamEnded
            except (_StreamEnded, grpc.RpcError) as error:
                if not (args.reconnect and updates and _resumable(error)):
                    raise
                delay = reconnect_delay(attempt)
                attempt += 1
                print(
                    f"{PROG}: {_describe(error)}; reconnecting in {delay:.1f} s",
                    file=err,
                    flush=True,
                )
                sleep(delay)


def _resumable(error: Exception) -> bool:
    return isinstance(error, _StreamEnded) or error.code() in _RESUMABLE  # type: ignore[attr-defined]


def _describe(error: Exception) -> str:
    if isinstance(error, _StreamEnded):
        return "the daemon ended the stream"
    return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]


def _show(
    summary: orderbook_pb2.Summary,
    args: argparse.Namespace,
    updates: int,
    redraw: bool,
    out: TextIO,
) -> None:
    if args.json:
        text = format_json(summary, args.symbol) + "\n"
    else:
        table = format_table(summary, args.symbol, updates, datetime.datetime.now())
        if redraw:
            text = _REDRAW + table
        else:
            text = ("\n" if updates > 1 else "") + table
    # One write per update so a redraw doesn't flicker half-drawn, and
    # a flush so a pipe reader sees each update as it happens.
    out.write(text)
    out.flush()


def _silence_stdout(out: TextIO) -> None:
    # After EPIPE the interpreter would retry flushing sys.stdout at exit and
    # print "Exception ignored ... BrokenPipeError"; send that flush to
    # /dev/null instead (the recipe from the `signal` module's docs).
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the client; return the process exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr

    # argparse prints --help/--version/usage errors to sys.stdout/sys.stderr
    # and raises SystemExit; route both to our streams and return the code.
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: {message}", file=err)
        return code

    try:
        _watch(args, out, err)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout(out)
        return EXIT_BROKEN_PIPE
    except _Unreachable:
        return fail(f"cannot reach the daemon at {args.addr}", EXIT_UNREACHABLE)
    except OSError as exc:  # --tls-ca unreadable
        return fail(f"{exc.filename}: {exc.strerror}", EXIT_ERROR)
    except _StreamEnded:
        return fail("the daemon ended the stream", EXIT_ERROR)
    except grpc.RpcError as exc:
        # Errors raised while iterating a stream are also its grpc.Call.
        code, details = exc.code(), exc.details()
        if code is grpc.StatusCode.UNAVAILABLE:
            return fail(f"cannot reach the daemon at {args.addr}", EXIT_UNREACHABLE)
        if code in _SYMBOL_ERRORS:
            return fail(f"{args.symbol}: {details}", EXIT_BAD_SYMBOL)
        return fail(f"{code.name}: {details}", EXIT_ERROR)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
