"""Prometheus metrics, every name prefixed `aggregator_`.

Defined once here on the default registry; the parts of the daemon bind the
label children they need at construction, so the hot path only calls inc().
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from aggregator import __version__

MESSAGES = Counter(
    "aggregator_messages", "Websocket frames received from an exchange.", ["exchange"]
)
REJECTS = Counter(
    "aggregator_rejects",
    "Exchange messages rejected (malformed JSON, bad numbers, bad ids, errors).",
    ["exchange", "reason"],
)
RESYNCS = Counter(
    "aggregator_resyncs", "Books resynchronised from a snapshot, by cause.", ["exchange", "reason"]
)
RECONNECTS = Counter(
    "aggregator_reconnects", "Websocket connections opened after the first.", ["exchange"]
)
CROSSED = Counter(
    "aggregator_crossed_books",
    "Single-exchange books seen crossed (kept: it is what the exchange publishes).",
    ["exchange"],
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class BookStates:
    """`aggregator_book_state`: a state set per (exchange, symbol), exposed
    like a prometheus_client Enum (one sample per state, 1 for the current).

    Not an Enum on the registry: with 1,500 symbols its 4,500+ samples took
    50-90 ms to format on every scrape, on the event loop (every stream
    waited). Here a book's lines are formatted when its state changes, and a
    scrape joins the strings (aggregator/metrics_http.py appends them).
    """

    name = "aggregator_book_state"
    documentation = "State of each exchange's book per symbol."
    states = ("syncing", "live", "stale")

    def __init__(self) -> None:
        # (exchange, symbol) → its lines; bounded by the watched books (a
        # book removes its entry when it is discarded).
        self._lines: dict[tuple[str, str], str] = {}

    def state(self, exchange: str, symbol: str, state: str) -> None:
        if state not in self.states:
            raise ValueError(f"unknown book state {state!r}")
        labels = f'{self.name}{{exchange="{_escape(exchange)}",symbol="{_escape(symbol)}",{self.name}="'
        self._lines[(exchange, symbol)] = "".join(
            f'{labels}{name}"}} {1.0 if name == state else 0.0}\n' for name in self.states
        )

    def remove(self, exchange: str, symbol: str) -> None:
        self._lines.pop((exchange, symbol), None)

    def value(self, exchange: str, symbol: str) -> str | None:
        """The state a book is exposed in, None if none (for tests and checks)."""
        lines = self._lines.get((exchange, symbol))
        if lines is None:
            return None
        return next(name for name, line in zip(self.states, lines.splitlines()) if line.endswith(" 1.0"))

    def render(self, openmetrics: bool) -> bytes:
        kind = "stateset" if openmetrics else "gauge"
        head = f"# HELP {self.name} {self.documentation}\n# TYPE {self.name} {kind}\n"
        return (head + "".join(self._lines.values())).encode()


BOOK_STATE = BookStates()
SNAPSHOT_REQUESTS = Counter(
    "aggregator_snapshot_requests",
    "REST book snapshots requested, by purpose (snapshot, verify).",
    ["exchange", "kind"],
)
ACTIVE_STREAMS = Gauge("aggregator_active_streams", "Open BookSummary streams.")
SUMMARIES_SENT = Counter("aggregator_summaries_sent", "Summaries handed to gRPC streams.")
SUMMARIES_CONFLATED = Counter(
    "aggregator_summaries_conflated",
    "Summaries dropped because a newer one replaced them before a slow client read them.",
)
MERGES_COALESCED = Counter(
    "aggregator_merges_coalesced",
    "Book changes merged together with an earlier change of the same symbol in the same "
    "reactor turn (one re-merge and one Summary for all of them).",
)
STREAMS_REFUSED = Counter(
    "aggregator_streams_refused",
    "BookSummary streams refused, by status code (resource_exhausted: a limit).",
    ["code"],
)
BUILD = Info("aggregator_build", "The running daemon's version.")
BUILD.info({"version": __version__})
UPDATE_LATENCY = Histogram(
    "aggregator_update_latency_seconds",
    # The arrival is the reactor's seconds() when the frame arrived, passed
    # along with the book change it caused (aggregator/book.py, BookListener)
    # and observed against the same clock when gRPC takes the Summary. A
    # Summary no frame caused (a snapshot, a disconnect) adds no sample.
    "From an exchange frame's arrival to the Summary reflecting it being handed to gRPC.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

SUBSCRIBE_RETRIES = Counter(
    "aggregator_subscribe_retries",
    "Subscriptions sent again, by cause (refused by the exchange, no reply in time).",
    ["exchange", "reason"],
)
BUFFER_OVERFLOWS = Counter(
    "aggregator_buffer_overflows",
    "Updates dropped because the buffering budget was spent (the book resyncs: a gap).",
    ["exchange"],
)
TLS_HANDSHAKES_REFUSED = Counter(
    "aggregator_tls_handshakes_refused",
    "TLS handshakes on the gRPC port that failed (e.g. no client certificate, or one the "
    "--tls-client-ca did not sign), as gRPC's own log reports them",
)

# -- Bybit --------------------------------------------------------------------
# Bybit re-sends a snapshot mid-stream after a problem on its side, and one
# with u = 1 after a service restart: the book is replaced, no resync needed.
BOOK_RESETS = Counter(
    "aggregator_book_resets",
    "Live books replaced by a snapshot the venue sent mid-stream, by cause (snapshot, restart).",
    ["exchange", "reason"],
)

# -- Recording (--record) ---------------------------------------------------------
RECORD_DROPPED = Counter(
    "aggregator_record_dropped",
    "Recorded events (frames, REST answers) dropped: the write buffer was full or the disk failed.",
)

GC_PAUSE = Histogram(
    "aggregator_gc_pause_seconds",
    "Garbage-collector runs (the event loop stands still meanwhile), by generation.",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
