"""SimulatorService: data sources + Binance and Bitstamp servers, as one Twisted service."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from .binance import BinanceRestResource, BinanceWebSocketFactory, exchange_info_symbols
from .bitstamp import BitstampRestResource, BitstampWebSocketFactory, pairs_info
from .connections import TrackingFactory
from .market import Market
from .player import PlayedSource
from .recorded import RecordedSource
from .synthetic import SyntheticSource

EXCHANGES = ("binance", "bitstamp")
SOURCES = ("synthetic", "recorded", "both")
# The four listeners, in the order of `urls`.
ENDPOINTS = ("binance_ws", "binance_rest", "bitstamp_ws", "bitstamp_rest")


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


class SimulatorService(Service):
    """Local Binance + Bitstamp market-data servers fed by synthetic and/or recorded books.

    `source`: "synthetic", "recorded" or "both". `speed` scales time (recorded gaps are divided
    by it, synthetic change rates multiplied). `loop=False`: recorded data is replayed once and
    each synthetic book stops after synthetic.FINITE_CHANGES (200) changes; `finished` then
    becomes True. Listening happens synchronously in startService, so `urls` is usable right
    after it. A stopped service can be started again: it listens on the same ports as before
    (also when they were ephemeral), so clients can reconnect to the same URLs.
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

        self._sources: list[PlayedSource] = []
        if source in ("synthetic", "both"):
            self._sources.append(SyntheticSource(reactor, seed=seed, speed=speed, loop=loop))
        if source in ("recorded", "both"):
            self._sources.append(RecordedSource(reactor, speed=speed, loop=loop))
        self._markets: dict[str, dict[str, Market]] = {e: {} for e in EXCHANGES}
        for src in self._sources:
            for (exchange, symbol), market in src.markets.items():
                if symbol in self._markets[exchange]:
                    raise ValueError(f"two sources for {exchange}:{symbol}")
                self._markets[exchange][symbol] = market

        binance, bitstamp = self._markets["binance"], self._markets["bitstamp"]
        self._binance_ws = BinanceWebSocketFactory(binance, reactor)
        self._bitstamp_ws = BitstampWebSocketFactory(bitstamp, reactor)
        self._binance_rest = TrackingFactory(
            _QuietSite(BinanceRestResource(binance, reactor, exchange_info_symbols(binance)), reactor=reactor)
        )
        self._bitstamp_rest = TrackingFactory(
            _QuietSite(BitstampRestResource(bitstamp, pairs_info(bitstamp)), reactor=reactor)
        )
        self._listening: list[IListeningPort] = []

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

    @property
    def connection_count(self) -> int:
        """Open client connections, websocket and REST (keep-alive) together."""
        return sum(len(f.connections) for f in self._factories())

    def drop_clients(self) -> Deferred[None]:
        """Abort every client connection (websocket and REST) but keep listening."""
        d = gatherResults([f.connections.drop_all() for f in self._factories()])
        d.addCallback(lambda _: None)
        return d

    # ------------------------------------------------------------ faults

    def lose_next_update(self, exchange: str, symbol: str) -> None:
        """Fault: do not send the next data frame of `symbol` (Binance: every depth stream of it,
        which shows as a U..u gap; Bitstamp: diff_order_book_, which clients cannot detect)."""
        if symbol not in self._markets[exchange]:
            raise KeyError(f"{exchange}:{symbol} is not served")
        hub = self._binance_ws.hub if exchange == "binance" else self._bitstamp_ws.hub
        hub.lose_next(symbol)

    def request_reconnect(self) -> None:
        """Fault: send Bitstamp's bts:request_reconnect to every Bitstamp websocket client."""
        self._bitstamp_ws.request_reconnect()

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
        self.log.info(
            "exchange simulator ({source}, seed {seed}, speed {speed}) listening: {urls}",
            source=self.source,
            seed=self.seed,
            speed=self.speed,
            urls=self.urls,
        )

    def stopService(self) -> Deferred[Any]:
        """Stop the sources and flushes, close the listeners and drop every client.

        Fires once every listener is closed and every connection has seen connectionLost.
        """
        super().stopService()
        for src in self._sources:
            src.stop()
        self._binance_ws.hub.stop()
        self._bitstamp_ws.hub.stop()
        listening, self._listening = self._listening, []
        waits = [maybeDeferred(port.stopListening) for port in listening]
        waits.append(self.drop_clients())
        d = gatherResults(waits)
        d.addCallback(lambda _: None)
        return d
