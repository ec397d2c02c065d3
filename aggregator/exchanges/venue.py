"""The contract between the venue-independent feed and one venue's module.

A venue is one adapter module (aggregator/exchanges/<venue>.py) plus one
simulator module: the adapter turns the venue's frames into book
transactions, the rest of the feed (symbol list, connection pool, demand)
never knows which venue it talks to. docs/DESIGN.md, "The feed layer".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from aggregator.book import ExchangeBook
from aggregator.instruments import Instrument

if TYPE_CHECKING:
    from aggregator.exchanges.connection import Connection
    from aggregator.http import JsonHttp


@dataclass(frozen=True)
class VenueSettings:
    """Everything about a venue's connections that is a number, not code."""

    # Outbound frames per second per connection (Binance: 5/s incl. pings and pongs).
    frames_per_second: float = 10.0
    auto_ping_interval: float = 30.0
    auto_ping_timeout: float = 10.0
    # Nothing at all received for this long (not even a ping) → reconnect.
    inactivity_timeout: float = 60.0
    # A connection that lived less than this counts as a flap: backoff keeps growing.
    healthy_period: float = 30.0
    # Rotate (make-before-break) before the venue closes old connections.
    max_connection_age: float | None = None
    max_symbols_per_connection: int = 1000
    # Symbols per subscribe/unsubscribe frame.
    symbols_per_frame: int = 100
    # A successor connection serves alongside the old one this long before handover.
    handover_overlap: float = 2.0
    # Seconds to wait for the venue to acknowledge a subscription.
    reply_timeout: float = 10.0
    rest_weight_per_minute: float = 600.0


class FeedContext(Protocol):
    """What an adapter may use of the feed it is plugged into."""

    rest_url: str
    books: dict[str, ExchangeBook]

    @property
    def name(self) -> str: ...

    @property
    def http(self) -> JsonHttp: ...

    @property
    def reactor(self) -> IReactorTime: ...

    def instrument(self, symbol: str) -> Instrument:
        """The venue's instrument behind a canonical symbol it lists."""

    def symbol_of(self, native: str) -> str | None:
        """The canonical symbol of the venue's native name, if it lists it."""

    def retry_delay(self, attempt: int) -> float:
        """Backoff before retry number `attempt` (0-based) of anything."""

    def reject(self, reason: str, format: str, **fields: Any) -> None:
        """Count a rejected message and log it once per burst."""

    def problem(self, key: object, format: str, **fields: Any) -> None:
        """Log a recurring problem once per burst (nothing counted)."""

    def resubscribe(self, connection: Connection, symbols: list[str], delay: float) -> None:
        """Send the subscription for `symbols` on `connection` again after `delay`."""

    def subscription_unanswered(self, connection: Connection, symbols: list[str]) -> None:
        """The venue never answered subscribing `symbols`: count it, say so
        once per burst, and subscribe them again at once."""

    def rotate(self, connection: Connection, reason: str) -> None:
        """Replace `connection` make-before-break."""

    def predecessor(self, connection: Connection) -> Connection | None:
        """The connection `connection` is replacing, while a handover is under way."""


class VenueAdapter(Protocol):
    """One venue's wire protocol and per-symbol sync, behind one interface."""

    name: str
    settings: VenueSettings
    # REST weight of the instrument-list request (Binance: exchangeInfo = 20).
    symbol_list_weight: float
    # The live venue's endpoints (--<name>-ws-url, --<name>-rest-url) and
    # what is appended to them, for --help.
    default_ws_url: str
    default_rest_url: str
    ws_url_help: str
    rest_url_help: str

    def connection_url(self, ws_url: str) -> str:
        """The websocket URL to connect to, given the configured base URL."""

    def symbol_list_path(self) -> str:
        """REST path (after the configured base URL) of the instrument list."""

    def parse_symbol_list(self, document: Any) -> Iterable[Instrument]:
        """The instrument list → the instruments with live books (trading)."""

    def subscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        """The frame subscribing `symbols` on `connection` (it is being sent)."""

    def unsubscribe_frame(self, connection: Connection, symbols: list[str]) -> Any:
        """The frame unsubscribing `symbols` on `connection` (it is being sent)."""

    def start_sync(self, book: ExchangeBook, connection: Connection, subscribed: bool) -> None:
        """Keep `book` in sync from `connection`; `subscribed`: the venue
        already streams it there (no acknowledgement to wait for)."""

    def synced_on(self, symbol: str) -> Connection | None:
        """The connection the symbol's sync takes its data from, if any."""

    def stop_sync(self, symbol: str) -> None:
        """Drop the symbol's sync state, cancelling its timers and requests."""

    def decode(self, payload: bytes) -> Any:
        """A frame's bytes → the message handle() takes; ValueError if they
        are not JSON. Most venues: orjson.loads. A venue may read only the
        part of a large frame that it needs (Bitstamp's BookFrame)."""

    def handle(self, connection: Connection, message: Any, arrival: float) -> None:
        """One decoded frame, received at reactor time `arrival`."""

    def connection_reset(self, connection: Connection) -> None:
        """`connection` opened or closed: forget what was pending on it."""

    def handover(self, old: Connection, new: Connection) -> None:
        """`new` now carries old's symbols; data from `old` is ignored from here on."""

    def idle_probe(self, connection: Connection) -> None:
        """Nothing received for a while: provoke an answer if the venue has a way."""

    def stop(self) -> None:
        """The feed stops: cancel every timer and request."""


class AdapterFactory(Protocol):
    """A venue adapter class: what the daemon reads of it before making one."""

    name: str
    default_ws_url: str
    default_rest_url: str
    ws_url_help: str
    rest_url_help: str

    def __call__(self, context: FeedContext) -> VenueAdapter: ...


class PendingReplies:
    """Requests on connections that the venue should answer, each with a deadline.

    A reply that never comes is not waited for forever: after `timeout` the
    request's symbols are handed to `expired` (which sends them again).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float,
        expired: Callable[[Connection, list[str]], None],
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._expired = expired
        self._pending: dict[tuple[Connection, object], tuple[list[str], IDelayedCall]] = {}

    def expect(self, connection: Connection, key: object, symbols: list[str]) -> None:
        self.answered(connection, key)  # a request sent again replaces the old one
        timer = self._reactor.callLater(self._timeout, self._expire, connection, key)
        self._pending[(connection, key)] = (symbols, timer)

    def answered(self, connection: Connection, key: object) -> list[str]:
        """The symbols of the request `key` on `connection`; [] if none pending."""
        entry = self._pending.pop((connection, key), None)
        if entry is None:
            return []
        symbols, timer = entry
        if timer.active():
            timer.cancel()
        return symbols

    def waiting(self, connection: Connection) -> list[object]:
        """The keys of the requests on `connection` still unanswered."""
        return [key for pending_connection, key in self._pending if pending_connection is connection]

    def forget(self, connection: Connection) -> None:
        for pending_connection, key in list(self._pending):
            if pending_connection is connection:
                self.answered(connection, key)

    def clear(self) -> None:
        for connection, key in list(self._pending):
            self.answered(connection, key)

    def _expire(self, connection: Connection, key: object) -> None:
        symbols, _ = self._pending.pop((connection, key))
        self._expired(connection, symbols)
