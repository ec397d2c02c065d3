"""SimulatorService: data sources + one server object per venue (venues.VENUES), as one
Twisted service. Faults are registry.FAULTS; how each applies to a venue is the venue's
business (venue.Venue)."""

from __future__ import annotations

import random
from collections import Counter
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from . import binance, bitstamp
from .control import ControlResource
from .faults import BAD_FRAME_KINDS, RandomFaults, RestRecord, Violation, valid_close_code
from .market import Market
from .player import PlayedSource
from .recorded import RecordedSource
from .registry import RANDOM_FAULTS, draw, parse_fault_names
from .scale import DEFAULT_RATE, DEFAULT_SYMBOLS, DEFAULT_TICK, ScaleSource, VenueLoad
from .synthetic import SyntheticSource
from .venue import Limits, Venue, VenueSetup
from .venues import EXCHANGES, VENUES

__all__ = ["EXCHANGES", "RANDOM_FAULTS", "SOURCES", "SimulatorService", "parse_fault_names"]

SOURCES = ("synthetic", "recorded", "both", "scale")
# Two listeners per venue, in the order of `urls`.
ENDPOINTS = tuple(f"{name}_{kind}" for name in EXCHANGES for kind in ("ws", "rest"))


class ListeningPort(Protocol):
    """What listenTCP returns (IListeningPort, as a typing Protocol: see clock.py)."""

    def getHost(self) -> Any: ...

    def stopListening(self) -> Deferred[None] | None: ...


def _normalise_ports(ports: Mapping[str, int] | None) -> dict[str, int]:
    """Accept keys "binance_ws", "binance_ws_url" or "binance_ws_port"; 0/missing = ephemeral."""
    result = dict.fromkeys(ENDPOINTS, 0)
    for key, value in (ports or {}).items():
        name = key.removesuffix("_url").removesuffix("_port")
        if name not in result:
            raise ValueError(f"unknown port key {key!r}; expected one of {ENDPOINTS}")
        result[name] = int(value or 0)
    return result


class SimulatorService(Service):
    """Local market-data servers, one per venue (Binance, Bitstamp), fed by synthetic,
    recorded or scale books, with switchable faults (FAULTS.md beside this file).

    `source`: "synthetic", "recorded", "both" or "scale". `speed` scales time (recorded gaps
    are divided by it, synthetic and scale rates multiplied). `loop=False`: recorded data is
    replayed once, each synthetic book stops after synthetic.FINITE_CHANGES (200) changes, the
    scale source after ~200 events per symbol; `finished` then becomes True. Listening happens
    synchronously in startService, so `urls` is usable right after it. A stopped service can be
    started again: it listens on the same ports as before (also when they were ephemeral), so
    clients can reconnect to the same URLs.

    Scale mode (scale.py): `symbols` generated symbols, `rate` Binance change events per
    second in total (each its own frame, carrying binance.SEND_TIME_FIELD), `bitstamp_rate`
    Bitstamp events per second (default rate / 10), generated every `tick` seconds.
    `scale_loads` (whole-market mode): each venue's own symbols, rate and per-symbol rate
    shape (scale.VenueLoad), instead of `rate` and `bitstamp_rate`.

    Faults: `faults` = "random" or comma-separated names from registry.RANDOM_FAULTS injects one every
    `fault_interval` seconds. Limits: `rest_weight_limit` (Binance weight per minute),
    `rest_ban_seconds` (418 ban length), `bitstamp_request_limit` (per 10 minutes),
    `max_messages_per_second` (Binance client frames per connection; None = unlimited),
    `connection_lifetime` (Binance, seconds; None = forever).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        source: str = "both",
        seed: int = 1,
        speed: float = 1.0,
        loop: bool = True,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
        *,
        symbols: int = DEFAULT_SYMBOLS,
        rate: float = DEFAULT_RATE,
        bitstamp_rate: float | None = None,
        tick: float = DEFAULT_TICK,
        scale_loads: Mapping[str, VenueLoad] | None = None,
        faults: str | Iterable[str] | None = None,
        fault_interval: float = 5.0,
        rest_weight_limit: int = binance.WEIGHT_LIMIT,
        rest_ban_seconds: float = binance.BAN_SECONDS,
        bitstamp_request_limit: int | None = bitstamp.REQUEST_LIMIT,
        max_messages_per_second: int | None = binance.MAX_MESSAGES_PER_SECOND,
        connection_lifetime: float | None = binance.CONNECTION_LIFETIME,
    ):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        if not speed > 0:
            raise ValueError("speed must be > 0")
        self._reactor = reactor
        self._host = host
        self._ports = _normalise_ports(ports)
        self.source = source
        self.seed = seed
        self.speed = speed
        self.loop = loop
        self.urls: dict[str, str] = {}
        self.violations: list[Violation] = []
        self._frame_listeners: list[Callable[[str, str, bytes], None]] = []

        self._sources: list[PlayedSource] = []
        self._scale: ScaleSource | None = None
        listings: dict[str, dict[str, dict]] = {}
        if source in ("synthetic", "both"):
            self._sources.append(SyntheticSource(reactor, seed=seed, speed=speed, loop=loop))
        if source in ("recorded", "both"):
            self._sources.append(RecordedSource(reactor, speed=speed, loop=loop))
        if source == "scale":
            self._scale = ScaleSource(
                reactor,
                seed=seed,
                symbols=symbols,
                rate=rate,
                bitstamp_rate=bitstamp_rate,
                speed=speed,
                loop=loop,
                tick=tick,
                loads=scale_loads,
            )
            self._sources.append(self._scale)
            listings = self._scale.listings
        markets: dict[str, dict[str, Market]] = {e: {} for e in EXCHANGES}
        for src in self._sources:
            for (exchange, symbol), market in src.markets.items():
                if symbol in markets[exchange]:
                    raise ValueError(f"two sources for {exchange}:{symbol}")
                markets[exchange][symbol] = market

        limits = Limits(
            rest_weight_limit=rest_weight_limit,
            rest_ban_seconds=rest_ban_seconds,
            bitstamp_request_limit=bitstamp_request_limit,
            max_messages_per_second=max_messages_per_second,
            connection_lifetime=connection_lifetime,
        )
        control = ControlResource(self)
        self._venues: dict[str, Venue] = {
            v.name: v(
                VenueSetup(
                    markets=markets[v.name],
                    reactor=reactor,
                    listings=listings.get(v.name, {}),
                    limits=limits,
                    on_violation=self.violations.append,
                    control=control,
                    batch=self._scale is not None,
                )
            )
            for v in VENUES
        }
        if self._scale is not None:
            self._scale.tick_listeners.extend(venue.end_tick for venue in self._venues.values())
        self._listening: list[ListeningPort] = []

        self._fault_names = parse_fault_names(faults)
        self._random_faults = RandomFaults(reactor, self._choose_fault, seed=seed, interval=fault_interval)

    # ------------------------------------------------------------ inspection

    def symbols(self, exchange: str) -> list[str]:
        """The lowercase symbols served on `exchange` ("binance" or "bitstamp")."""
        return sorted(self._venue(exchange).markets)

    def market(self, exchange: str, symbol: str) -> Market:
        """The Market behind a book (ids, microtimestamps, listeners); for tests and tools."""
        return self._venue(exchange).markets[symbol]

    def true_book(self, exchange: str, symbol: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The current true book: (bids best-first, asks best-first) as floats parsed from the
        exact strings the simulator sends."""
        return self.market(exchange, symbol).book.floats()

    @property
    def finished(self) -> bool:
        """With loop=False: True once every source has played all of its data."""
        return all(src.finished for src in self._sources)

    def frames_sent(self, exchange: str, symbol: str | None = None) -> int:
        """Data frames built for subscribers of `exchange` (per stream/channel, whatever the
        number of sockets on it; bad frames included), for one symbol or all."""
        hub = self._venue(exchange).hub
        return hub.frames_sent if symbol is None else hub.frames_by_symbol[symbol]

    def add_frame_listener(self, listener: Callable[[str, str, bytes], None]) -> None:
        """Call `listener(exchange, symbol, frame_json)` for every data frame built (once per
        stream/channel). For benchmarks; it runs on the hot path, keep it cheap."""
        if not self._frame_listeners:
            for name, venue in self._venues.items():
                venue.hub.frame_listeners.append(partial(self._on_frame, name))
        self._frame_listeners.append(listener)

    def remove_frame_listener(self, listener: Callable[[str, str, bytes], None]) -> None:
        if listener in self._frame_listeners:
            self._frame_listeners.remove(listener)
        if not self._frame_listeners:
            for venue in self._venues.values():
                venue.hub.frame_listeners.clear()

    def _on_frame(self, exchange: str, symbol: str, frame: bytes) -> None:
        for listener in self._frame_listeners:
            listener(exchange, symbol, frame)

    def scale_stats(self) -> dict[str, Any] | None:
        """Scale mode: symbols, scale seconds played, and per exchange the target rate,
        events generated, events skipped (reactor too late) and achieved rate. None otherwise."""
        return self._scale.stats() if self._scale is not None else None

    def rest_log(self, exchange: str) -> list[RestRecord]:
        """Every REST request to `exchange` (control endpoint excluded), oldest first."""
        return list(self._venue(exchange).gate.log_records)

    def rest_weight_used(self, exchange: str) -> int:
        """Weight (Binance) or requests (Bitstamp) used in the current rate-limit window."""
        return self._venue(exchange).gate.limiter.used(self._reactor.seconds())

    def stalled(self, exchange: str) -> int:
        """How many websocket connections of `exchange` are stalled now."""
        return self._venue(exchange).ws.stalled

    def connections(self, exchange: str) -> int:
        """Open websocket connections of `exchange`."""
        return len(self._venue(exchange).ws.connections)

    @property
    def faults_injected(self) -> list[str]:
        """Descriptions of the random faults injected so far."""
        return list(self._random_faults.injected)

    def status(self) -> dict[str, Any]:
        """A JSON-able summary (what GET /_sim/status returns)."""
        return {
            "source": self.source,
            "urls": self.urls,
            "symbols": {e: len(v.markets) for e, v in self._venues.items()},
            "connections": {e: self.connections(e) for e in self._venues},
            "stalled": {e: self.stalled(e) for e in self._venues},
            "frames_sent": {e: self.frames_sent(e) for e in self._venues},
            "rest_requests": {e: len(v.gate.log_records) for e, v in self._venues.items()},
            "rest_weight_used": {e: self.rest_weight_used(e) for e in self._venues},
            "violations": dict(Counter(f"{v.exchange}:{v.kind}" for v in self.violations)),
            "faults_injected": len(self._random_faults.injected),
            "scale": self.scale_stats(),
        }

    # ------------------------------------------------------------ control

    def pause(self) -> None:
        """Stop generating changes; connections stay open and pings go on."""
        for src in self._sources:
            src.pause()

    def resume(self) -> None:
        for src in self._sources:
            src.resume()

    def _venue(self, exchange: str) -> Venue:
        venue = self._venues.get(exchange)
        if venue is None:
            raise ValueError(f"exchange must be one of {EXCHANGES}, not {exchange!r}")
        return venue

    def _served(self, exchange: str, symbol: str) -> Venue:
        venue = self._venue(exchange)
        if symbol not in venue.markets:
            raise KeyError(f"{exchange}:{symbol} is not served")
        return venue

    def _listeners(self) -> dict[str, Factory[Any]]:
        """The factory of each listener, by ENDPOINTS name."""
        factories: dict[str, Factory[Any]] = {}
        for name, venue in self._venues.items():
            factories[f"{name}_ws"] = venue.ws
            factories[f"{name}_rest"] = venue.rest_site
        return factories

    @property
    def connection_count(self) -> int:
        """Open client connections, websocket and REST (keep-alive) together."""
        return sum(len(v.ws.connections) + len(v.rest_site.connections) for v in self._venues.values())

    def drop_clients(self, exchange: str | None = None, *, websocket: bool = True, rest: bool = True) -> Deferred[None]:
        """Fault: abort client connections (TCP reset, no close frame) but keep listening.

        Default: every connection of every venue, websocket and REST (keep-alive). Fires
        once each dropped connection has seen connectionLost."""
        venues = self._venues.values() if exchange is None else [self._venue(exchange)]
        drops = []
        for venue in venues:
            if websocket:
                drops.append(venue.ws.connections.drop_all())
            if rest:
                drops.append(venue.rest_site.connections.drop_all())
        return gatherResults(drops).addCallback(lambda _: None)

    # ------------------------------------------------------------ faults: websocket

    def stall(self, exchange: str, duration: float | None = None) -> int:
        """Fault: every open websocket connection of `exchange` goes silent without closing: no
        data, no pings, no answers to the client's pings, heartbeats or requests (reading
        stops), until `unstall` or for `duration` seconds. Data meanwhile is lost (Binance: the
        first frame after shows a U gap). Connections opened later are served normally.
        Returns how many connections were stalled."""
        if duration is not None and duration < 0:
            raise ValueError("duration must be >= 0")
        return self._venue(exchange).ws.stall(duration)

    def unstall(self, exchange: str | None = None) -> int:
        """End the stalls of `exchange` (or every venue) now; returns how many connections resumed."""
        venues = self._venues.values() if exchange is None else [self._venue(exchange)]
        return sum(venue.ws.unstall() for venue in venues)

    def lose_next_update(self, exchange: str, symbol: str) -> None:
        """Fault: do not send the next data frame of `symbol` (Binance: every depth stream of it,
        which shows as a U..u gap; Bitstamp: diff_order_book_, which clients cannot detect)."""
        self._served(exchange, symbol).lose_next_update(symbol)

    def skip_updates(self, exchange: str, symbol: str, count: int = 1) -> tuple[int, int] | None:
        """Fault: a gap in the sequence. Binance: `count` update ids of `symbol` are used up by
        nothing, so the next frame's U is last u + count + 1 (the true book is unaffected, so a
        resync is correct); returns the skipped id range. Bitstamp (no ids): the next `count`
        diff_order_book_ frames are lost; returns None."""
        venue = self._served(exchange, symbol)
        if count < 1:
            raise ValueError("count must be >= 1")
        return venue.skip_updates(symbol, count)

    def send_bad_frame(self, exchange: str, symbol: str, kind: str) -> int:
        """Fault: send a bad frame to the subscribers of `symbol`: kind is one of
        faults.BAD_FRAME_KINDS (malformed_json, nan_price, inf_price, zero_price,
        negative_amount, wrong_types, unknown_event). On Binance a corrupt frame uses up one
        update id, so a correct client must resync; unknown_event uses none and should be
        ignored. Returns how many streams/channels it went to."""
        venue = self._served(exchange, symbol)
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"kind must be one of {BAD_FRAME_KINDS}, not {kind!r}")
        return venue.send_bad_frame(symbol, kind)

    def request_reconnect(self, close_after: float | None = None) -> int:
        """Fault: send Bitstamp's bts:request_reconnect (every venue that has such a message)
        to every websocket client. Old connections keep being served (a client may open its
        new one first); with `close_after` they are closed (1001) that many seconds later.
        Returns how many."""
        return sum(v.request_reconnect(close_after) for v in self._venues.values() if v.asks_reconnect)

    def close_clients(self, exchange: str, code: int = 1000, reason: str = "") -> int:
        """Fault: close every websocket connection of `exchange` with a close frame carrying
        `code` and `reason`, e.g. Binance's 24-hour limit (1001, "24h connection limit") or
        pong timeout (1008, "Pong timeout"). Returns how many connections were closed."""
        if not valid_close_code(code):
            raise ValueError(f"invalid close code {code}")
        return self._venue(exchange).ws.close_clients(code, reason)

    # ------------------------------------------------------------ faults: REST

    def rest_fault(
        self,
        exchange: str,
        statuses: Iterable[int | str],
        retry_after: float | None = None,
        path: str | None = None,
    ) -> None:
        """Fault: answer the next REST requests of `exchange` (only those whose path starts
        with `path`, if given) with these HTTP statuses, one request each, e.g. [429, 418, 503];
        "drop" (or 0) aborts the connection without an answer. 429 and 418 carry Retry-After
        (`retry_after`, default 1 s for 429 and the ban length for 418) and behave like real
        ones: on Binance, requests before a 429's Retry-After elapses get 418."""
        self._venue(exchange).gate.force(list(statuses), retry_after, path)

    def slow_rest(self, exchange: str, delay: float, count: int | None = None) -> None:
        """Fault: hold back the next `count` REST responses of `exchange` (all, when None) by
        `delay` seconds (reactor.callLater; content as of the request). delay=0 ends it."""
        self._venue(exchange).gate.slow(delay, count)

    def stale_snapshot(self, exchange: str, symbol: str, updates_ago: int = 10) -> None:
        """Fault: serve the next REST snapshot of `symbol` as of `updates_ago` change events
        ago: the book, lastUpdateId (Binance) or microtimestamp (Bitstamp) it had then (at most
        market.HISTORY events back)."""
        venue = self._served(exchange, symbol)
        if updates_ago < 1:
            raise ValueError("updates_ago must be >= 1")
        venue.stale_snapshot(symbol, updates_ago)

    # ------------------------------------------------------------ random faults

    def inject_random_fault(self, names: Iterable[str] | None = None) -> str:
        """Inject one random recoverable fault now (from `names`, default the configured ones
        or all of RANDOM_FAULTS); returns its one-line description (also logged)."""
        if names is not None:
            chosen = parse_fault_names(list(names))
            description, action = self._choose_fault(self._random_faults.rng, chosen)
            self.log.info("fault: {description}", description=description)
            self._random_faults.injected.append(description)
            action()
            return description
        return self._random_faults.inject()

    def _choose_fault(self, rng: random.Random, names: tuple[str, ...] | None = None) -> tuple[str, Callable[[], Any]]:
        description, fault, kwargs = draw(
            rng, names or self._fault_names or RANDOM_FAULTS, list(self._venues.values()), self._random_faults.interval
        )
        return description, partial(fault.apply, self, kwargs)

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        factories = self._listeners()
        try:
            for name in ENDPOINTS:
                port = self._reactor.listenTCP(self._ports[name], factories[name], interface=self._host)
                self._listening.append(port)
                # Remember ephemeral ports: a restart comes back at the same URLs.
                self._ports[name] = port.getHost().port
        except Exception:
            for port in self._listening:
                port.stopListening()
            self._listening = []
            raise
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = {"ws": "ws", "rest": "http"}
        self.urls = {
            f"{name}_url": f"{scheme[name.rpartition('_')[2]]}://{host}:{self._ports[name]}" for name in ENDPOINTS
        }
        super().startService()
        for venue in self._venues.values():
            venue.start()
        for src in self._sources:
            src.start()
        if self._fault_names:
            self._random_faults.start()
        self.log.info(
            "exchange simulator ({source}, seed {seed}, speed {speed}) listening: {urls}",
            source=self.source,
            seed=self.seed,
            speed=self.speed,
            urls=self.urls,
        )

    def stopService(self) -> Deferred[Any]:
        """Stop the sources, flushes and faults, close the listeners and drop every client.

        Fires once every listener is closed and every connection has seen connectionLost.
        """
        super().stopService()
        self._random_faults.stop()
        for src in self._sources:
            src.stop()
        for venue in self._venues.values():
            venue.stop()
        listening, self._listening = self._listening, []
        waits: list[Deferred[Any]] = [maybeDeferred(port.stopListening) for port in listening]
        waits.append(self.drop_clients())
        return gatherResults(waits).addCallback(lambda _: None)
