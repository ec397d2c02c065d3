"""SimulatorService: data sources + Binance and Bitstamp servers, as one Twisted service."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from . import binance as binance_mod
from .binance import BinanceRestResource, BinanceWebSocketFactory, exchange_info_symbols, request_weight
from .bitstamp import BitstampRestResource, BitstampWebSocketFactory, pairs_info
from .connections import TrackingFactory
from .control import ControlResource
from .faults import (
    BAD_FRAME_KINDS,
    REASON_24H,
    REASON_PONG_TIMEOUT,
    RandomFaults,
    RestRecord,
    Violation,
    valid_close_code,
)
from .market import Market
from .player import PlayedSource
from .recorded import RecordedSource
from .rest import RestGate, WeightLimiter, binance_error_body
from .scale import DEFAULT_RATE, DEFAULT_SYMBOLS, DEFAULT_TICK, ScaleSource
from .synthetic import SyntheticSource
from .wsserver import SimServerFactory

EXCHANGES = ("binance", "bitstamp")
SOURCES = ("synthetic", "recorded", "both", "scale")
# The four listeners, in the order of `urls`.
ENDPOINTS = ("binance_ws", "binance_rest", "bitstamp_ws", "bitstamp_rest")
# Faults `--faults random` draws from: all recoverable by a correct client.
RANDOM_FAULTS = (
    "drop",
    "stall",
    "skip_updates",
    "lose_next_update",
    "bad_frame",
    "request_reconnect",
    "close",
    "rest_fault",
    "stale_snapshot",
    "slow_rest",
)
# Bitstamp REST: requests per 10 minutes (PROTOCOLS §2.6).
BITSTAMP_REQUEST_LIMIT = 10_000
BITSTAMP_WINDOW = 600.0
BAN_SECONDS = 120.0


class _QuietSite(Site):
    """A Site without the per-request access log line (it would swamp the daemon's log)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def _normalise_ports(ports: Mapping[str, int] | None) -> dict[str, int]:
    """Accept keys "binance_ws", "binance_ws_url" or "binance_ws_port"; 0/missing = ephemeral."""
    result = dict.fromkeys(ENDPOINTS, 0)
    for key, value in (ports or {}).items():
        name = key.removesuffix("_url").removesuffix("_port")
        if name not in result:
            raise ValueError(f"unknown port key {key!r}; expected one of {ENDPOINTS}")
        result[name] = int(value or 0)
    return result


def parse_fault_names(faults: str | Iterable[str] | None) -> tuple[str, ...]:
    """None/"none" → (); "random" → every RANDOM_FAULTS; "stall,drop" → those."""
    if faults is None:
        return ()
    names = [n.strip() for n in (faults.split(",") if isinstance(faults, str) else faults) if n.strip()]
    if names in (["none"], []):
        return ()
    if names == ["random"]:
        return RANDOM_FAULTS
    unknown = [n for n in names if n not in RANDOM_FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; expected 'random', 'none' or names from {RANDOM_FAULTS}")
    return tuple(names)


class SimulatorService(Service):
    """Local Binance + Bitstamp market-data servers fed by synthetic, recorded or scale books,
    with switchable faults (FAULTS.md beside this file).

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

    Faults: `faults` = "random" or comma-separated names from RANDOM_FAULTS injects one every
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
        faults: str | Iterable[str] | None = None,
        fault_interval: float = 5.0,
        rest_weight_limit: int = binance_mod.WEIGHT_LIMIT,
        rest_ban_seconds: float = BAN_SECONDS,
        bitstamp_request_limit: int | None = BITSTAMP_REQUEST_LIMIT,
        max_messages_per_second: int | None = binance_mod.MAX_MESSAGES_PER_SECOND,
        connection_lifetime: float | None = binance_mod.CONNECTION_LIFETIME,
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
        listings: dict[str, dict[str, dict]] = {e: {} for e in EXCHANGES}
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
            )
            self._sources.append(self._scale)
            listings = self._scale.listings
        self._markets: dict[str, dict[str, Market]] = {e: {} for e in EXCHANGES}
        for src in self._sources:
            for (exchange, symbol), market in src.markets.items():
                if symbol in self._markets[exchange]:
                    raise ValueError(f"two sources for {exchange}:{symbol}")
                self._markets[exchange][symbol] = market

        binance, bitstamp = self._markets["binance"], self._markets["bitstamp"]
        record = self.violations.append
        self._binance_ws = BinanceWebSocketFactory(
            binance,
            reactor,
            on_violation=record,
            batch=self._scale is not None,
            max_messages_per_second=max_messages_per_second,
            connection_lifetime=connection_lifetime,
        )
        self._bitstamp_ws = BitstampWebSocketFactory(bitstamp, reactor, on_violation=record)
        if self._scale is not None:
            self._scale.tick_listeners.append(self._binance_ws.hub.end_tick)

        control = ControlResource(self)
        self._binance_rest_resource = BinanceRestResource(
            binance, reactor, exchange_info_symbols(binance, listings["binance"]), rest_weight_limit
        )
        self._bitstamp_rest_resource = BitstampRestResource(bitstamp, pairs_info(bitstamp, listings["bitstamp"]))
        self._gates = {
            "binance": RestGate(
                "binance",
                self._binance_rest_resource,
                reactor,
                WeightLimiter(rest_weight_limit, 60.0, rest_ban_seconds),
                weigher=request_weight,
                used_header=b"x-mbx-used-weight-1m",
                error_body=binance_error_body(rest_weight_limit, reactor),
                on_violation=record,
                control=control,
            ),
            "bitstamp": RestGate(
                "bitstamp",
                self._bitstamp_rest_resource,
                reactor,
                WeightLimiter(bitstamp_request_limit, BITSTAMP_WINDOW, None),
                on_violation=record,
                control=control,
            ),
        }
        self._binance_rest = TrackingFactory(_QuietSite(self._gates["binance"], reactor=reactor))
        self._bitstamp_rest = TrackingFactory(_QuietSite(self._gates["bitstamp"], reactor=reactor))
        self._listening: list[IListeningPort] = []

        self._fault_names = parse_fault_names(faults)
        self._random_faults = RandomFaults(reactor, self._choose_fault, seed=seed, interval=fault_interval)

    # ------------------------------------------------------------ inspection

    def symbols(self, exchange: str) -> list[str]:
        """The lowercase symbols served on `exchange` ("binance" or "bitstamp")."""
        return sorted(self._markets[exchange])

    def market(self, exchange: str, symbol: str) -> Market:
        """The Market behind a book (ids, microtimestamps, listeners); for tests and tools."""
        return self._markets[exchange][symbol]

    def true_book(self, exchange: str, symbol: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The current true book: (bids best-first, asks best-first) as floats parsed from the
        exact strings the simulator sends."""
        return self._markets[exchange][symbol].book.floats()

    @property
    def finished(self) -> bool:
        """With loop=False: True once every source has played all of its data."""
        return all(src.finished for src in self._sources)

    def frames_sent(self, exchange: str, symbol: str | None = None) -> int:
        """Data frames built for subscribers of `exchange` (per stream/channel, whatever the
        number of sockets on it; bad frames included), for one symbol or all."""
        hub = self._factory(exchange).hub  # type: ignore[attr-defined]
        return hub.frames_sent if symbol is None else hub.frames_by_symbol[symbol]

    def add_frame_listener(self, listener: Callable[[str, str, bytes], None]) -> None:
        """Call `listener(exchange, symbol, frame_json)` for every data frame built (once per
        stream/channel). For benchmarks; it runs on the hot path, keep it cheap."""
        if not self._frame_listeners:
            self._binance_ws.hub.frame_listeners.append(self._on_binance_frame)
            self._bitstamp_ws.hub.frame_listeners.append(self._on_bitstamp_frame)
        self._frame_listeners.append(listener)

    def remove_frame_listener(self, listener: Callable[[str, str, bytes], None]) -> None:
        if listener in self._frame_listeners:
            self._frame_listeners.remove(listener)
        if not self._frame_listeners:
            self._binance_ws.hub.frame_listeners.clear()
            self._bitstamp_ws.hub.frame_listeners.clear()

    def _on_binance_frame(self, symbol: str, frame: bytes) -> None:
        for listener in self._frame_listeners:
            listener("binance", symbol, frame)

    def _on_bitstamp_frame(self, symbol: str, frame: bytes) -> None:
        for listener in self._frame_listeners:
            listener("bitstamp", symbol, frame)

    def scale_stats(self) -> dict[str, Any] | None:
        """Scale mode: symbols, scale seconds played, and per exchange the target rate,
        events generated, events skipped (reactor too late) and achieved rate. None otherwise."""
        return self._scale.stats() if self._scale is not None else None

    def rest_log(self, exchange: str) -> list[RestRecord]:
        """Every REST request to `exchange` (control endpoint excluded), oldest first."""
        return list(self._gate(exchange).log_records)

    def rest_weight_used(self, exchange: str) -> int:
        """Weight (Binance) or requests (Bitstamp) used in the current rate-limit window."""
        return self._gate(exchange).limiter.used(self._reactor.seconds())

    def stalled(self, exchange: str) -> int:
        """How many websocket connections of `exchange` are stalled now."""
        return self._factory(exchange).stalled

    def connections(self, exchange: str) -> int:
        """Open websocket connections of `exchange`."""
        return len(self._factory(exchange).connections)

    @property
    def faults_injected(self) -> list[str]:
        """Descriptions of the random faults injected so far."""
        return list(self._random_faults.injected)

    def status(self) -> dict[str, Any]:
        """A JSON-able summary (what GET /_sim/status returns)."""
        return {
            "source": self.source,
            "urls": self.urls,
            "symbols": {e: len(self._markets[e]) for e in EXCHANGES},
            "connections": {e: self.connections(e) for e in EXCHANGES},
            "stalled": {e: self.stalled(e) for e in EXCHANGES},
            "frames_sent": {e: self.frames_sent(e) for e in EXCHANGES},
            "rest_requests": {e: len(self._gate(e).log_records) for e in EXCHANGES},
            "rest_weight_used": {e: self.rest_weight_used(e) for e in EXCHANGES},
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

    def _factories(self) -> tuple[Any, ...]:
        return (self._binance_ws, self._binance_rest, self._bitstamp_ws, self._bitstamp_rest)

    def _factory(self, exchange: str) -> SimServerFactory:
        if exchange == "binance":
            return self._binance_ws
        if exchange == "bitstamp":
            return self._bitstamp_ws
        raise ValueError(f"exchange must be one of {EXCHANGES}, not {exchange!r}")

    def _gate(self, exchange: str) -> RestGate:
        if exchange not in self._gates:
            raise ValueError(f"exchange must be one of {EXCHANGES}, not {exchange!r}")
        return self._gates[exchange]

    def _served(self, exchange: str, symbol: str) -> Market:
        self._factory(exchange)
        market = self._markets[exchange].get(symbol)
        if market is None:
            raise KeyError(f"{exchange}:{symbol} is not served")
        return market

    @property
    def connection_count(self) -> int:
        """Open client connections, websocket and REST (keep-alive) together."""
        return sum(len(f.connections) for f in self._factories())

    def drop_clients(self, exchange: str | None = None, *, websocket: bool = True, rest: bool = True) -> Deferred[None]:
        """Fault: abort client connections (TCP reset, no close frame) but keep listening.

        Default: every connection of both exchanges, websocket and REST (keep-alive). Fires
        once each dropped connection has seen connectionLost."""
        if exchange is not None:
            self._factory(exchange)
        factories = []
        for name, factory in zip(ENDPOINTS, self._factories()):
            ex, kind = name.split("_")
            if (exchange is None or ex == exchange) and (websocket if kind == "ws" else rest):
                factories.append(factory)
        d = gatherResults([f.connections.drop_all() for f in factories])
        d.addCallback(lambda _: None)
        return d

    # ------------------------------------------------------------ faults: websocket

    def stall(self, exchange: str, duration: float | None = None) -> int:
        """Fault: every open websocket connection of `exchange` goes silent without closing: no
        data, no pings, no answers to the client's pings, heartbeats or requests (reading
        stops), until `unstall` or for `duration` seconds. Data meanwhile is lost (Binance: the
        first frame after shows a U gap). Connections opened later are served normally.
        Returns how many connections were stalled."""
        if duration is not None and duration < 0:
            raise ValueError("duration must be >= 0")
        count = self._factory(exchange).stall(duration)
        self.log.info("fault: stalled {n} {exchange} connections for {d}", n=count, exchange=exchange, d=duration)
        return count

    def unstall(self, exchange: str | None = None) -> int:
        """End the stalls of `exchange` (or both) now; returns how many connections resumed."""
        exchanges = EXCHANGES if exchange is None else (exchange,)
        return sum(self._factory(e).unstall() for e in exchanges)

    def lose_next_update(self, exchange: str, symbol: str) -> None:
        """Fault: do not send the next data frame of `symbol` (Binance: every depth stream of it,
        which shows as a U..u gap; Bitstamp: diff_order_book_, which clients cannot detect)."""
        self._served(exchange, symbol)
        if exchange == "binance":
            self._binance_ws.hub.lose_next(symbol)
        else:
            self._bitstamp_ws.hub.lose_next(symbol)

    def skip_updates(self, exchange: str, symbol: str, count: int = 1) -> tuple[int, int] | None:
        """Fault: a gap in the sequence. Binance: `count` update ids of `symbol` are used up by
        nothing, so the next frame's U is last u + count + 1 (the true book is unaffected, so a
        resync is correct); returns the skipped id range. Bitstamp (no ids): the next `count`
        diff_order_book_ frames are lost; returns None."""
        self._served(exchange, symbol)
        if count < 1:
            raise ValueError("count must be >= 1")
        if exchange == "binance":
            return self._binance_ws.hub.skip_ids(symbol, count)
        self._bitstamp_ws.hub.lose_next(symbol, count)
        return None

    def send_bad_frame(self, exchange: str, symbol: str, kind: str) -> int:
        """Fault: send a bad frame to the subscribers of `symbol`: kind is one of
        faults.BAD_FRAME_KINDS (malformed_json, nan_price, inf_price, zero_price,
        negative_amount, wrong_types, unknown_event). On Binance a corrupt frame uses up one
        update id, so a correct client must resync; unknown_event uses none and should be
        ignored. Returns how many streams/channels it went to."""
        self._served(exchange, symbol)
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"kind must be one of {BAD_FRAME_KINDS}, not {kind!r}")
        return self._factory(exchange).hub.send_bad_frame(symbol, kind)  # type: ignore[attr-defined]

    def request_reconnect(self, close_after: float | None = None) -> int:
        """Fault: send Bitstamp's bts:request_reconnect to every Bitstamp websocket client.
        Old connections keep being served (a client may open its new one first); with
        `close_after` they are closed (1001) that many seconds later. Returns how many."""
        return self._bitstamp_ws.request_reconnect(close_after)

    def close_clients(self, exchange: str, code: int = 1000, reason: str = "") -> int:
        """Fault: close every websocket connection of `exchange` with a close frame carrying
        `code` and `reason`, e.g. Binance's 24-hour limit (1001, "24h connection limit") or
        pong timeout (1008, "Pong timeout"). Returns how many connections were closed."""
        if not valid_close_code(code):
            raise ValueError(f"invalid close code {code}")
        return self._factory(exchange).close_clients(code, reason)

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
        self._gate(exchange).force(list(statuses), retry_after, path)

    def slow_rest(self, exchange: str, delay: float, count: int | None = None) -> None:
        """Fault: hold back the next `count` REST responses of `exchange` (all, when None) by
        `delay` seconds (reactor.callLater; content as of the request). delay=0 ends it."""
        self._gate(exchange).slow(delay, count)

    def stale_snapshot(self, exchange: str, symbol: str, updates_ago: int = 10) -> None:
        """Fault: serve the next REST snapshot of `symbol` as of `updates_ago` change events
        ago: the book, lastUpdateId (Binance) or microtimestamp (Bitstamp) it had then (at most
        market.HISTORY events back)."""
        self._served(exchange, symbol)
        if updates_ago < 1:
            raise ValueError("updates_ago must be >= 1")
        resource = self._binance_rest_resource if exchange == "binance" else self._bitstamp_rest_resource
        resource.stale[symbol] = updates_ago

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
        name = rng.choice(names or self._fault_names or RANDOM_FAULTS)
        exchange = rng.choice(EXCHANGES)
        hub = self._factory(exchange).hub  # type: ignore[attr-defined]
        candidates = hub.subscribed_symbols() or self.symbols(exchange)
        symbol = rng.choice(candidates) if candidates else None
        if name in ("skip_updates", "lose_next_update", "bad_frame", "stale_snapshot") and symbol is None:
            name = "drop"
        if name == "drop":
            return f"drop {exchange} websocket clients", lambda: self.drop_clients(exchange, rest=False)
        if name == "stall":
            duration = round(rng.uniform(1.0, max(1.0, min(self._random_faults.interval, 10.0))), 1)
            return f"stall {exchange} for {duration} s", lambda: self.stall(exchange, duration)
        if name == "skip_updates":
            count = rng.randint(1, 5)
            return f"skip {count} updates of {exchange}:{symbol}", lambda: self.skip_updates(exchange, symbol, count)
        if name == "lose_next_update":
            return f"lose the next update of {exchange}:{symbol}", lambda: self.lose_next_update(exchange, symbol)
        if name == "bad_frame":
            kind = rng.choice(BAD_FRAME_KINDS)
            return f"bad frame {kind} on {exchange}:{symbol}", lambda: self.send_bad_frame(exchange, symbol, kind)
        if name == "request_reconnect":
            close_after = round(rng.uniform(1.0, 5.0), 1)
            return (
                f"bitstamp request_reconnect, close after {close_after} s",
                lambda: self.request_reconnect(close_after),
            )
        if name == "close":
            if exchange == "binance":
                code, reason = rng.choice(((1001, REASON_24H), (1008, REASON_PONG_TIMEOUT)))
            else:
                code, reason = 1001, "Server maintenance"
            return f"close {exchange} clients {code} {reason!r}", lambda: self.close_clients(exchange, code, reason)
        if name == "rest_fault":
            statuses = rng.choice(([429], [500], [503], ["drop"]))
            retry_after = rng.randint(1, 3)
            return (
                f"{exchange} REST answers {statuses[0]} (Retry-After {retry_after})",
                lambda: self.rest_fault(exchange, statuses, retry_after),
            )
        if name == "stale_snapshot":
            ago = rng.randint(1, 20)
            return (
                f"next {exchange}:{symbol} snapshot {ago} updates stale",
                lambda: self.stale_snapshot(exchange, symbol, ago),
            )
        if name == "slow_rest":
            delay = round(rng.uniform(0.5, 3.0), 1)
            count = rng.randint(1, 5)
            return f"slow {exchange} REST: {count} responses {delay} s late", lambda: self.slow_rest(exchange, delay, count)
        raise ValueError(f"unknown fault {name!r}")

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        factories = dict(zip(ENDPOINTS, self._factories()))
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
        self.urls = {
            "binance_ws_url": f"ws://{host}:{self._ports['binance_ws']}",
            "binance_rest_url": f"http://{host}:{self._ports['binance_rest']}",
            "bitstamp_ws_url": f"ws://{host}:{self._ports['bitstamp_ws']}",
            "bitstamp_rest_url": f"http://{host}:{self._ports['bitstamp_rest']}",
        }
        super().startService()
        self._binance_ws.hub.start()
        self._bitstamp_ws.hub.start()
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
        self._binance_ws.hub.stop()
        self._bitstamp_ws.hub.stop()
        self._binance_ws.stop()
        self._bitstamp_ws.stop()
        for gate in self._gates.values():
            gate.stop()
        listening, self._listening = self._listening, []
        waits = [maybeDeferred(port.stopListening) for port in listening]
        waits.append(self.drop_clients())
        d = gatherResults(waits)
        d.addCallback(lambda _: None)
        return d
