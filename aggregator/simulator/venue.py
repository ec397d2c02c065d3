"""The venue-simulator interface: what one exchange's simulator gives SimulatorService.

A venue is one subclass of `Venue` (Bitstamp: bitstamp.py; Binance, which has more rules to
enforce, the binance package) listed in venues.VENUES. The service builds one instance per
venue and only ever talks to this interface, so it never asks which venue it holds; adding a
venue is writing its module and listing it.

What a venue provides:

- class level, used by the data sources before any server exists: its `name`, how its books
  are written (`decimals`, `first_update_id`), how it lists generated symbols
  (`scale_listing`), its share of the scale source's rate and its synthetic half-spread;
- per instance (`build` makes them, as `Servers`): its websocket server factory (`ws`, a
  wsserver.SimServerFactory, which also owns the stall / close / drop faults), the hub that
  turns book changes into its frames (`hub`, see `Hub`), its REST resource (`snapshots`)
  behind a rest.RestGate (`gate`: request log, limits, REST faults), served by `rest_site`;
- how each book fault of registry.FAULTS applies to it: `lose_next_update`, `skip_updates`,
  `send_bad_frame`, `stale_snapshot`, `request_reconnect`, and the close frames random mode
  draws from (`close_reasons`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol

from twisted.web.resource import Resource

from .connections import TrackingFactory
from .faults import Violation
from .market import Market
from .rest import QuietSite, RestGate
from .wsserver import SimServerFactory

if TYPE_CHECKING:
    from .scale import ScaleSpec


class Hub(Protocol):
    """Subscriptions of one venue's websocket clients and the data frames sent to them."""

    frames_sent: int  # data frames built (once per stream/channel, whatever the sockets)
    frames_by_symbol: Counter[str]
    frame_listeners: list[Callable[[str, bytes], None]]  # called with (symbol, frame)

    def subscribed_symbols(self) -> list[str]:
        """Served symbols with at least one subscriber."""

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        """A corrupt frame (faults.BAD_FRAME_KINDS) to the symbol's subscribers; how many
        streams/channels it went to."""

    def start(self) -> None:
        """Start listening to the markets (and any flush timers)."""

    def stop(self) -> None:
        """Stop listening and drop whatever is pending."""


class Snapshots(Protocol):
    """A REST resource serving book snapshots, which a stale_snapshot fault can age."""

    stale: dict[str, int]  # symbol -> the next snapshot is served this many change events old


@dataclass(frozen=True)
class Limits:
    """The rule settings of SimulatorService; each venue takes the ones that apply to it."""

    rest_weight_limit: int  # Binance REST weight per minute
    rest_ban_seconds: float  # Binance 418 ban length
    bitstamp_request_limit: int | None  # Bitstamp REST requests per 10 minutes
    max_messages_per_second: int | None  # Binance client frames per connection
    connection_lifetime: float | None  # Binance, seconds


@dataclass(frozen=True)
class VenueSetup:
    """What the service hands each venue it builds."""

    markets: Mapping[str, Market]  # the venue's served books, by lowercase symbol
    reactor: Any  # the reactor (time, listening, callLater): tests pass a clock
    listings: Mapping[str, dict]  # listing entries of generated symbols (scale source)
    limits: Limits
    on_violation: Callable[[Violation], None]
    control: Resource  # the /_sim/ endpoint, served on every REST port
    batch: bool  # scale source: every change event is its own frame


@dataclass(frozen=True)
class Servers:
    """The parts of a venue's simulator that serve its clients."""

    ws: SimServerFactory  # the websocket listener's factory; owns stall, close and drop
    hub: Hub
    snapshots: Snapshots  # the REST resource
    gate: RestGate  # in front of the REST resource: log, limits, REST faults, /_sim/


class Venue(ABC):
    """One exchange's simulator (see the module docstring). Subclasses set the class
    attributes and build their servers in `build`."""

    name: ClassVar[str]
    # Scale source: this venue's change events per second, as a share of the `rate` asked for.
    scale_share: ClassVar[float]
    # Synthetic source: half the quoted spread, in units of the symbol's level grid.
    synthetic_half_spread: ClassVar[float]
    # The close frames (code, reason) the random `close` fault picks from.
    close_reasons: ClassVar[tuple[tuple[int, str], ...]]
    # Whether the venue can ask its clients to reconnect (the request_reconnect fault).
    asks_reconnect: ClassVar[bool] = False
    # The synthetic symbols (synthetic.SYMBOLS) the venue lists; None: all of
    # them. Venues listing one symbol quote around one shared fair value.
    synthetic_symbols: ClassVar[frozenset[str] | None] = None

    def __init__(self, setup: VenueSetup) -> None:
        self.markets = setup.markets
        servers = self.build(setup)
        self.ws = servers.ws
        self.hub = servers.hub
        self.snapshots = servers.snapshots
        self.gate = servers.gate
        # The REST listener's factory; it tracks the connections, so that they can be dropped.
        self.rest_site = TrackingFactory(QuietSite(servers.gate, reactor=setup.reactor))

    @abstractmethod
    def build(self, setup: VenueSetup) -> Servers:
        """Make the venue's servers for these markets and settings."""

    # ------------------------------------------------------------ how its books look

    @staticmethod
    @abstractmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        """(price, amount) decimals the venue writes for a generated book of `symbol` whose
        prices are multiples of 10**-tick_exp."""

    @staticmethod
    def first_update_id(rng: random.Random) -> int:
        """The update id a generated book starts at (venues without ids: 0)."""
        return 0

    @staticmethod
    @abstractmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        """The venue's listing entry (exchange info) of a generated scale-source symbol."""

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        self.hub.start()

    def stop(self) -> None:
        self.hub.stop()
        self.ws.stop()
        self.gate.stop()

    def end_tick(self) -> None:
        """The scale source generated a tick's worth of changes: write what batch mode holds
        back (venues that send each change at once have nothing to do)."""

    # ------------------------------------------------------------ faults on its books

    @abstractmethod
    def lose_next_update(self, symbol: str) -> None:
        """Do not send the next data frame of `symbol`."""

    @abstractmethod
    def skip_updates(self, symbol: str, count: int) -> Any:
        """A gap of `count` updates in the symbol's sequence; returns what was skipped (e.g.
        the update-id range) or None."""

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        return self.hub.send_bad_frame(symbol, kind)

    def stale_snapshot(self, symbol: str, updates_ago: int) -> None:
        self.snapshots.stale[symbol] = updates_ago

    def request_reconnect(self, close_after: float | None) -> int:
        """Ask every client to reconnect (venues with `asks_reconnect`); how many were asked."""
        raise ValueError(f"{self.name} has no reconnect request")
