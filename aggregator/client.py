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
import importlib.resources
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Callable, NoReturn, TextIO

import grpc

from aggregator import __version__
from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.address import split_host_port

PROG = "aggregator-client"
DEFAULT_SYMBOL = "ethbtc"
# The daemon's default listening address (as in the original Rust demo).
DEFAULT_ADDR = "[::1]:9051"
DEFAULT_TIMEOUT = 5.0

EXIT_OK = 0
EXIT_ERROR = 1  # also a bad command line
EXIT_UNREACHABLE = 2
EXIT_BAD_SYMBOL = 3
EXIT_NOT_READY = 4  # the daemon answered UNAVAILABLE (e.g. exchanges' symbol lists not loaded)
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
# On a terminal the table is redrawn this often even without an update, so
# that the age keeps counting while the book is quiet or the daemon down.
_TICK = 1.0
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


def column_widths(summary: orderbook_pb2.Summary) -> tuple[int, int, int]:
    """(exchange, amount, price) widths the Summary's table needs."""
    levels = list(summary.bids) + list(summary.asks)
    return (
        max([len("exchange")] + [len(lv.exchange) for lv in levels]),
        max([len("amount")] + [len(t) for t in align_numbers([lv.amount for lv in levels])]),
        max([len("price")] + [len(t) for t in align_numbers([lv.price for lv in levels])]),
    )


def format_table(
    summary: orderbook_pb2.Summary,
    symbol: str,
    updates: int,
    now: datetime.datetime,
    widths: tuple[int, int, int] = (0, 0, 0),
    status: str = "",
) -> str:
    """The Summary as a text table: bids on the left, asks on the right, best first.

    The header shows the update's age and, on a second line, each exchange's
    book state, when the daemon sends them, then `status` if any. Columns
    are at least `widths` wide (see column_widths), so that successive
    tables can keep their columns in place.
    """
    bids, asks = list(summary.bids), list(summary.asks)
    # Both price columns share one precision so bid and ask read alike; the
    # same for the amounts.
    prices = align_numbers([lv.price for lv in bids + asks])
    amounts = align_numbers([lv.amount for lv in bids + asks])
    bid_prices, ask_prices = prices[: len(bids)], prices[len(bids) :]
    bid_amounts, ask_amounts = amounts[: len(bids)], amounts[len(bids) :]
    price_decimals = _decimals(prices[0]) if prices else None

    ex_w, amount_w, price_w = map(max, zip(column_widths(summary), widths))

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
    if status:
        lines.append(status)
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


# argparse's own messages name the conversion function ("invalid
# _positive_int value: 'abc'"): these say what was expected instead.


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _address(text: str) -> str:
    # Caught here, not by gRPC: it would take "::1:9051" for a name to
    # resolve and wait out --timeout before failing.
    try:
        split_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and a hint, not argparse's usage block; status 1 (2 means
        the daemon is unreachable)."""
        message = message.removeprefix("argument ").replace("/--", ", --")
        self.exit(EXIT_ERROR, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Built per call so the environment defaults are read when main() runs,
    # not when the module is imported.
    parser = _Parser(
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
        type=_address,
        default=os.environ.get("GRPC_ADDR", DEFAULT_ADDR),
        metavar="HOST:PORT",
        help="daemon address, an IPv6 address in brackets "
        "(default: $GRPC_ADDR, else %(default)s)",
    )
    parser.add_argument(
        "--exchanges",
        type=_names,
        default=(),
        metavar="NAME,...",
        help="merge only these exchanges' books, e.g. binance,kraken (default: all the "
        "daemon's)",
    )
    parser.add_argument(
        "--depth",
        type=_positive_int,
        default=0,
        metavar="N",
        help="levels per side, at most the daemon's --depth (default: the daemon's --depth)",
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
        "--tls-cert",
        metavar="PEM",
        help="client certificate chain, for a daemon that requires one "
        "(--tls-client-ca); implies --tls, needs --tls-key",
    )
    parser.add_argument(
        "--tls-key", metavar="PEM", help="the unencrypted private key of --tls-cert"
    )
    parser.add_argument(
        "--proto",
        action=_PrintProto,
        help="print the gRPC API (orderbook.proto), for generating clients, and exit",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}"
    )
    return parser


class _PrintProto(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        sys.stdout.write(proto_text())
        parser.exit()


def proto_text() -> str:
    """The .proto the daemon serves, as installed with the package."""
    return importlib.resources.files("aggregator._proto").joinpath("orderbook.proto").read_text()


def reconnect_delay(
    attempt: int, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds before reconnection attempt `attempt` (0, 1, ...): doubling from
    RECONNECT_INITIAL up to RECONNECT_MAX, less up to a half at random so that
    the clients of a restarted daemon do not all come back at once."""
    delay = min(RECONNECT_MAX, RECONNECT_INITIAL * 2.0**attempt)
    return delay * (1 - jitter() / 2)


class _Unreachable(Exception):
    """The channel did not become ready within the timeout (the reason as
    gRPC last saw it)."""


class _StreamEnded(Exception):
    """The server closed the stream cleanly before we were done."""


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.addr, options=_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key),
        certificate_chain=_read(args.tls_cert),
    )
    return grpc.secure_channel(args.addr, credentials, options=_CHANNEL_OPTIONS)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


class _Screen:
    """Where Summaries and notices go.

    Not on a terminal: each Summary printed in turn, notices on stderr. On a
    terminal: one table redrawn in place, with the latest notice in it (a
    notice on stderr would be wiped by the next redraw), every _TICK seconds
    too, so that its age keeps counting while nothing arrives. Columns only
    grow, so they do not jump between redraws.
    """

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.redraw = not args.json and out.isatty()
        self.updates = 0
        self._summary: orderbook_pb2.Summary | None = None
        self._widths = (0, 0, 0)
        self._status = ""
        self._lock = threading.Lock()  # the ticker thread draws too
        self._stopped = threading.Event()

    def show(self, summary: orderbook_pb2.Summary) -> None:
        self.updates += 1
        with self._lock:
            self._summary = summary
            self._widths = tuple(map(max, zip(self._widths, column_widths(summary))))  # type: ignore[assignment]
            self._write(self._render(summary))

    def notify(self, text: str) -> None:
        if self.redraw:
            with self._lock:
                self._status = f"{time.strftime('%H:%M:%S')} {text}"
                if self._summary is not None:
                    self._write(self._render(self._summary))
            if self.err.isatty():
                return  # the table shows it; on the terminal it would be wiped
        print(f"{PROG}: {text}", file=self.err, flush=True)

    def run_ticker(self) -> None:
        if self.redraw:
            threading.Thread(target=self._tick, name="redraw", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _tick(self) -> None:
        while not self._stopped.wait(_TICK):
            with self._lock:
                if self._summary is not None and not self._stopped.is_set():
                    self._write(self._render(self._summary))

    def _render(self, summary: orderbook_pb2.Summary) -> str:
        if self.args.json:
            return format_json(summary, self.args.symbol) + "\n"
        table = format_table(
            summary, self.args.symbol, self.updates, datetime.datetime.now(),
            self._widths, self._status,
        )
        if self.redraw:
            return _REDRAW + table
        return ("\n" if self.updates > 1 else "") + table

    def _write(self, text: str) -> None:
        # One write per update so a redraw doesn't flicker half-drawn, and
        # a flush so a pipe reader sees each update as it happens.
        self.out.write(text)
        self.out.flush()


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
    screen = _Screen(args, out, err)
    # Leaving the `with` closes the channel, which cancels the stream.
    with _channel(args) as channel:
        ready = grpc.channel_ready_future(channel)
        stub = orderbook_pb2_grpc.AggregatorStub(channel)
        request = orderbook_pb2.Request(
            symbol=args.symbol, exchanges=args.exchanges, depth=args.depth
        )
        try:
            ready.result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise _Unreachable(_connection_error(stub, request)) from None
        attempt = 0
        screen.run_ticker()
        try:
            while True:
                try:
                    # Once reconnecting, wait for the daemon to be back rather
                    # than fail at once while it is down.
                    for summary in stub.BookSummary(request, wait_for_ready=screen.updates > 0):
                        if attempt:
                            screen.notify("reconnected")
                            attempt = 0
                        screen.show(summary)
                        if screen.updates == args.count:
                            return
                    raise _StreamEnded
                except (_StreamEnded, grpc.RpcError) as error:
                    if not (args.reconnect and screen.updates and _resumable(error)):
                        raise
                    delay = reconnect_delay(attempt)
                    attempt += 1
                    screen.notify(f"{_describe(error)}; reconnecting in {delay:.1f} s")
                    sleep(delay)
        finally:
            screen.stop()


def _connection_error(stub: orderbook_pb2_grpc.AggregatorStub, request: orderbook_pb2.Request) -> str:
    """Why the channel is not ready, as gRPC last saw it ("Connection
    refused", a TLS handshake failure, a name that does not resolve): a call
    that does not wait for the connection fails at once with it."""
    try:
        next(iter(stub.BookSummary(request, timeout=1)))
    except grpc.RpcError as error:
        # "failed to connect to all addresses; last error: UNKNOWN:
        # ipv4:127.0.0.1:9: Failed to connect to remote host: Connection
        # refused": the last part is the one a user knows.
        details: str = error.details() or ""
        return details.rpartition(": ")[2].rstrip("]") or details
    return "connection attempts timed out"


def _resumable(error: Exception) -> bool:
    return isinstance(error, _StreamEnded) or error.code() in _RESUMABLE  # type: ignore[attr-defined]


def _describe(error: Exception) -> str:
    if isinstance(error, _StreamEnded):
        return "the daemon ended the stream"
    return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]


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
    if (args.tls_cert is None) != (args.tls_key is None):
        print(f"{PROG}: error: --tls-cert and --tls-key go together (see {PROG} --help)",
              file=err)
        return EXIT_ERROR

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
    except _Unreachable as exc:
        hint = ""
        if args.tls or args.tls_ca or args.tls_cert:
            # A refused handshake looks like any closed connection.
            hint = "; or it refused the TLS handshake: check --tls-ca, --tls-cert and --tls-key"
        return fail(f"cannot reach the daemon at {args.addr} ({exc}){hint}", EXIT_UNREACHABLE)
    except OSError as exc:  # a --tls-* file unreadable
        return fail(f"{exc.filename}: {exc.strerror}", EXIT_ERROR)
    except _StreamEnded:
        return fail("the daemon ended the stream", EXIT_ERROR)
    except grpc.RpcError as exc:
        # Errors raised while iterating a stream are also its grpc.Call.
        code, details = exc.code(), exc.details()
        if code is grpc.StatusCode.UNAVAILABLE:
            # The connection was up (else _Unreachable): the daemon said why.
            return fail(f"the daemon at {args.addr} is not ready: {details}", EXIT_NOT_READY)
        if code in _SYMBOL_ERRORS:
            return fail(f"{args.symbol}: {details}", EXIT_BAD_SYMBOL)
        return fail(f"{code.name}: {details}", EXIT_ERROR)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
