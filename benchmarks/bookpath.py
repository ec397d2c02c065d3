"""Book-apply cost: µs per Binance diff message through the daemon's own code path, in one
process, no sockets:

    frame bytes → VenueFeed.frame_received (orjson, counters) → BinanceAdapter.handle →
    DepthSync (ids, checks, commit) → OrderBook.apply → Merger re-merge of the live books' top 10 (a Binance
    and a Bitstamp book per symbol) → Summary serialized once → offered to one subscriber

on a message sequence made of the recorded Binance traffic (aggregator/simulator/fixtures,
4 symbols) and of synthetic frames of the scale source (the benchmark's simulator), each
symbol starting from its snapshot. The same frames go through cryptofeed's Binance book
handler (`Binance.message_handler`: JSON decode with Decimal, id checks, book update, book
callback), if cryptofeed is installed (`pip install '.[bench]'`), starting from the same
snapshots.

Per venue (`measure_venues`): each venue's own steady-state update message (Binance
depthUpdate, Bitstamp order_book_ whole book, Bybit delta, Coinbase l2_data update, Kraken
checksummed book update), all making the same level changes, through that venue's adapter and
sync, one book and one subscriber each; reported per message and as a ratio to the Binance diff.

Best of several rounds (each from fresh books): the least disturbed by the machine's noise.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable

import orjson

from aggregator.simulator import fixtures

Level = tuple[str, str]


@dataclass
class Sequence:
    """Snapshots (per lowercase symbol) and the frames that follow them, in order."""

    name: str
    exchange_info: dict
    snapshots: dict[str, dict] = field(default_factory=dict)  # {"lastUpdateId", "bids", "asks"}
    bitstamp: dict[str, tuple[list[Level], list[Level]]] = field(default_factory=dict)
    frames: list[bytes] = field(default_factory=list)


def recorded_sequence() -> Sequence:
    """The recorded depth frames (raw, as received) after their symbol's REST snapshot."""
    recording = fixtures.binance_recording()
    seq = Sequence("recorded", recording.exchange_info)
    for symbol, snap in recording.snapshots.items():
        seq.snapshots[symbol] = {
            "lastUpdateId": snap.last_update_id,
            "bids": [list(level) for level in snap.bids],
            "asks": [list(level) for level in snap.asks],
        }
    for line in fixtures.read_lines("BINANCE.ws.1.0"):
        if line.kind != "recv":
            continue
        message = orjson.loads(line.body)
        data = message.get("data") if isinstance(message, dict) else None
        if isinstance(data, dict) and data.get("e") == "depthUpdate":
            symbol = data["s"].lower()
            if symbol in seq.snapshots and data["u"] > seq.snapshots[symbol]["lastUpdateId"]:
                seq.frames.append(line.body.encode() if isinstance(line.body, str) else line.body)
    # A Bitstamp book per symbol, so the merge has two books like in the daemon.
    for symbol, snap in seq.snapshots.items():
        seq.bitstamp[symbol] = _shifted(snap)
    return seq


def synthetic_sequence(symbols: int, messages: int, seed: int = 7) -> Sequence:
    """Frames of the simulator's scale source (one change event per frame, as the benchmark's
    simulator sends them, send-time field included), generated on a fake clock."""
    from twisted.internet.task import Clock

    from aggregator.simulator import binance as sim_binance
    from aggregator.simulator.scale import ScaleSource

    clock = Clock()
    clock.advance(1_700_000_000.0)
    rate = 10_000.0
    source = ScaleSource(clock, seed=seed, symbols=symbols, rate=rate, bitstamp_rate=0.0, tick=0.01)
    exchange_info = {
        "rateLimits": [],
        "symbols": [source.listings["binance"][s] for s in sorted(source.listings["binance"])],
    }
    seq = Sequence("synthetic", exchange_info)
    send_time_field = getattr(sim_binance, "SEND_TIME_FIELD", "simSendTime")
    for (exchange, symbol), market in source.markets.items():
        bids, asks = market.book.levels()
        if exchange == "binance":
            seq.snapshots[symbol] = {
                "lastUpdateId": market.last_update_id,
                "bids": [list(level) for level in bids],
                "asks": [list(level) for level in asks],
            }
        else:
            seq.bitstamp[symbol] = (list(bids), list(asks))
    dumps = orjson.dumps

    def on_update(update: Any) -> None:
        if len(seq.frames) >= messages:
            return
        seq.frames.append(
            dumps(
                {
                    "stream": f"{update.symbol}@depth@100ms",
                    "data": {
                        "e": "depthUpdate",
                        "E": int(clock.seconds() * 1000),
                        "s": update.symbol.upper(),
                        "U": update.first_id,
                        "u": update.last_id,
                        "b": update.bids,
                        "a": update.asks,
                        send_time_field: clock.seconds(),
                    },
                }
            )
        )

    for (exchange, _), market in source.markets.items():
        if exchange == "binance":
            market.subscribe(on_update)
    source.start()
    while len(seq.frames) < messages:
        clock.advance(0.01)
    source.stop()
    return seq


def _shifted(snapshot: dict) -> tuple[list[Level], list[Level]]:
    """A plausible second exchange's book: the same levels, one price step apart."""
    bids = [(repr(float(p) * 0.99995), a) for p, a in snapshot["bids"][:100]]
    asks = [(repr(float(p) * 1.00005), a) for p, a in snapshot["asks"][:100]]
    return bids, asks


def combined(*sequences: Sequence) -> Sequence:
    out = Sequence("+".join(s.name for s in sequences), {"rateLimits": [], "symbols": []})
    for s in sequences:
        out.exchange_info["symbols"] += s.exchange_info.get("symbols", [])
        out.snapshots.update(s.snapshots)
        out.bitstamp.update(s.bitstamp)
        out.frames += s.frames
    return out


# -- our path -------------------------------------------------------------------------------


class _Http:
    """JsonHttp stand-in: answers every GET at once from prepared documents."""

    class _Limiter:
        def set_budget(self, weight_per_minute: float) -> None:
            pass

    def __init__(self, documents: Callable[[str], Any]) -> None:
        self.documents = documents
        self.limiter = self._Limiter()

    def get_json(self, url: str, weight: float = 1.0) -> Any:
        from twisted.internet.defer import succeed

        return succeed(self.documents(url))

    def close(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


class _NoSocket:
    """A connector's service that connects nothing: the benchmark opens the
    connections by hand."""

    def startService(self) -> None:
        pass

    def stopService(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


def _no_socket(connection: Any) -> _NoSocket:
    return _NoSocket()


class _Protocol:
    """What a Connection needs of its websocket protocol."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.sent.append(payload)

    def dropConnection(self, abort: bool = False) -> None:
        pass


class _StaticFeed:
    """A second exchange whose books are a fixed snapshot, live at once. It
    lists the same markets as `twin` (the Binance feed)."""

    name = "bitstamp"

    def __init__(self, books: dict[str, tuple[list[Level], list[Level]]], twin: Any) -> None:
        self._books = books
        self._twin = twin

    def instrument(self, symbol: str) -> Any:
        return self._twin.instrument(symbol)

    def listed_symbols(self) -> frozenset[str]:
        return frozenset(self._books)

    def when_symbols_loaded(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)

    def watch(self, book: Any) -> None:
        bids, asks = self._books[book.symbol]
        book.book.replace([(float(p), float(a)) for p, a in bids], [(float(p), float(a)) for p, a in asks])
        book.go_live()

    def unwatch(self, symbol: str) -> None:
        pass


class OurPath:
    """The daemon's feed + merger wired as in the daemon, minus the sockets."""

    def __init__(self, seq: Sequence) -> None:
        from twisted.internet.task import Clock

        from aggregator.exchanges.binance import BinanceAdapter
        from aggregator.exchanges.feed import VenueFeed
        from aggregator.merger import Merger

        self.clock = Clock()
        self.clock.advance(1_700_000_000.0)
        rest = "http://rest.invalid"

        def documents(url: str) -> Any:
            if "/exchangeInfo" in url:
                return seq.exchange_info
            symbol = url.split("symbol=")[1].split("&")[0].lower()
            return seq.snapshots[symbol]

        self.feed = VenueFeed(BinanceAdapter, "ws://ws.invalid", rest, reactor=self.clock,
                              http=_Http(documents), connector=_no_socket)
        self.feed.startService()  # the symbol list loads at once from _Http
        if self.feed.listed_symbols() is None:
            raise RuntimeError("book path: the feed did not take the symbol list")
        self.merger = Merger([self.feed, _StaticFeed(seq.bitstamp, self.feed)], depth=10)
        self.merger.startService()
        self.delivered = 0
        for symbol in seq.snapshots:
            self._drain(self.merger.subscribe(symbol))
        self.clock.advance(0)  # demand → connections
        for connection in self.feed.connections:
            protocol = _Protocol()
            connection.connection_opened(protocol)
            self.clock.advance(0)
            for _ in range(len(self.feed.books)):
                # Every SUBSCRIBE acknowledged (frames are paced: advance the clock).
                for payload in protocol.sent:
                    request = orjson.loads(payload)
                    if request.get("method") == "SUBSCRIBE":
                        connection.message_received(orjson.dumps({"result": None, "id": request["id"]}))
                protocol.sent.clear()
                if not connection.sending:
                    break
                self.clock.advance(1.0)
        self.connections = {}
        for shard in self.feed.pool.shards:
            for symbol in shard.symbols:
                self.connections[symbol] = shard.active
        not_live = [s for s, b in self.feed.books.items() if not b.live]
        if not_live:
            raise RuntimeError(f"book path: {len(not_live)} books did not go live, e.g. {not_live[0]}")

    def _drain(self, subscription: Any) -> None:
        def got(summary: Any) -> None:
            if summary is not None:
                self.delivered += 1
                self._drain(subscription)

        subscription.next().addCallback(got)

    def run(self, frames: list[bytes], symbols: list[str]) -> float:
        """Seconds to push every frame through the path."""
        receive = [self.connections[s].message_received for s in symbols]
        perf = time.perf_counter
        start = perf()
        for frame, message_received in zip(frames, receive):
            message_received(frame)
        return perf() - start


def _frame_symbols(frames: list[bytes]) -> list[str]:
    return [orjson.loads(f)["stream"].partition("@")[0] for f in frames]


def measure_ours(seq: Sequence, rounds: int) -> dict[str, Any]:
    symbols = _frame_symbols(seq.frames)
    best = float("inf")
    delivered = 0
    for _ in range(rounds):
        path = OurPath(seq)
        gc.collect()
        best = min(best, path.run(seq.frames, symbols))
        delivered = path.delivered
        stale = [s for s, b in path.feed.books.items() if not b.live]
        if stale:
            raise RuntimeError(f"book path: {len(stale)} books went stale, e.g. {stale[0]}")
    return {"us_per_msg": best / len(seq.frames) * 1e6, "messages": len(seq.frames), "summaries": delivered}


# -- the floor: decode + apply + top 10, nothing else ----------------------------------------


def measure_floor(seq: Sequence, rounds: int) -> dict[str, Any]:
    """The least any Python book path does per message: orjson decode, float parse, a
    SortedDict side per book, the top 10 of both sides read back. No ids, no validation,
    no merge, no serialization."""
    from sortedcontainers import SortedDict

    best = float("inf")
    for _ in range(rounds):
        books = {
            symbol: (
                SortedDict({float(p): float(a) for p, a in snap["bids"]}),
                SortedDict({float(p): float(a) for p, a in snap["asks"]}),
            )
            for symbol, snap in seq.snapshots.items()
        }
        loads = orjson.loads
        gc.collect()
        perf = time.perf_counter
        start = perf()
        for frame in seq.frames:
            data = loads(frame)["data"]
            bids, asks = books[data["s"].lower()]
            for side, levels in ((bids, data["b"]), (asks, data["a"])):
                for p, a in levels:
                    p, a = float(p), float(a)
                    if a > 0.0:
                        side[p] = a
                    else:
                        side.pop(p, None)
            top_b = [(p, bids[p]) for p in bids.keys()[-10:]]
            top_a = [(p, asks[p]) for p in asks.keys()[:10]]
        best = min(best, perf() - start)
        del top_b, top_a
    return {"us_per_msg": best / len(seq.frames) * 1e6}


# -- cryptofeed -----------------------------------------------------------------------------


def cryptofeed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("cryptofeed")
    except Exception:
        return None


def measure_cryptofeed(seq: Sequence, rounds: int) -> dict[str, Any]:
    from cryptofeed.defines import L2_BOOK
    from cryptofeed.exchanges import Binance
    from cryptofeed.symbols import Symbols
    from cryptofeed.types import OrderBook

    Symbols.set(Binance.id, *Binance._parse_symbol_data(seq.exchange_info))
    to_std = {exchange: std for std, exchange in Symbols.get(Binance.id)[0].items()}
    callbacks = [0]

    async def on_book(book: Any, receipt_timestamp: float) -> None:
        callbacks[0] += 1

    texts = [f.decode() for f in seq.frames]
    best = float("inf")
    for _ in range(rounds):
        std_symbols = {symbol: to_std[symbol.upper()] for symbol in seq.snapshots}
        feed = Binance(symbols=sorted(set(std_symbols.values())), channels=[L2_BOOK], callbacks={L2_BOOK: on_book})
        for symbol, snap in seq.snapshots.items():
            std = std_symbols[symbol]
            feed.last_update_id[std] = snap["lastUpdateId"]
            feed._l2_book[std] = OrderBook(
                feed.id,
                std,
                max_depth=feed.max_depth,
                bids={Decimal(p): Decimal(a) for p, a in snap["bids"]},
                asks={Decimal(p): Decimal(a) for p, a in snap["asks"]},
            )
        callbacks[0] = 0

        async def run() -> float:
            handler = feed.message_handler
            perf = time.perf_counter
            now = time.time()
            start = perf()
            for text in texts:
                await handler(text, None, now)
            return perf() - start

        gc.collect()
        loop = asyncio.new_event_loop()
        try:
            best = min(best, loop.run_until_complete(run()))
        finally:
            loop.close()
    if callbacks[0] != len(texts):
        raise RuntimeError(f"cryptofeed applied {callbacks[0]} of {len(texts)} messages (a reset?)")
    return {"us_per_msg": best / len(texts) * 1e6, "messages": len(texts)}


# -- Bitstamp: whole top-100 messages ---------------------------------------------------------

BITSTAMP_PAIR = "ethusd"


def bitstamp_frames(count: int, changed: int = 10) -> tuple[dict, list[bytes]]:
    """The recorded ethusd snapshot's top 100 a side as `order_book_` messages (the channel's
    shape, PROTOCOLS.md §2.3), each with the amounts of its top `changed` levels a side
    changed; and the snapshot document that seeds the book."""
    recording = fixtures.bitstamp_recording()
    snap = recording.snapshots[BITSTAMP_PAIR]
    bids = [list(level) for level in snap.bids[:100]]
    asks = [list(level) for level in snap.asks[:100]]
    start_us = 1_700_000_000 * 1_000_000
    document = {"timestamp": str(start_us // 10**6), "microtimestamp": str(start_us),
                "bids": bids, "asks": asks}
    frames = []
    for k in range(1, count + 1):
        micros = start_us + k * 1000
        new_bids = [[p, f"{float(a) + k * 1e-8:.8f}"] for p, a in bids[:changed]] + bids[changed:]
        new_asks = [[p, f"{float(a) + k * 1e-8:.8f}"] for p, a in asks[:changed]] + asks[changed:]
        frames.append(orjson.dumps({
            "data": {"timestamp": str(micros // 10**6), "microtimestamp": str(micros),
                     "bids": new_bids, "asks": new_asks},
            "channel": f"order_book_{BITSTAMP_PAIR}", "event": "data",
        }))
    return document, frames


@dataclass
class VenueCase:
    """What bringing one venue's book live and keeping it changing takes: its adapter, its
    REST answers (symbol list, snapshot), its in-band answers to the frames the feed sent
    (acks, snapshot), and the steady-state update messages to time."""

    adapter: Any
    documents: Callable[[str], Any]
    greet: Callable[[list[dict]], list[bytes]]
    frames: list[bytes]


def _bitstamp_greet(pair: str) -> Callable[[list[dict]], list[bytes]]:
    # The acknowledgement makes the sync fetch its REST snapshot, which goes live.
    def greet(sent: list[dict]) -> list[bytes]:
        return [orjson.dumps({"event": "bts:subscription_succeeded",
                              "channel": f"order_book_{pair}", "data": {}})]

    return greet


def recorded_bitstamp_case(document: dict, frames: list[bytes]) -> VenueCase:
    """The recorded pair's listing and snapshot, then `frames`."""
    from aggregator.exchanges.bitstamp import BitstampAdapter

    info = fixtures.bitstamp_pair_entry(BITSTAMP_PAIR)
    return VenueCase(BitstampAdapter,
                     lambda url: [info] if "trading-pairs-info" in url else document,
                     _bitstamp_greet(BITSTAMP_PAIR), frames)


class VenuePath:
    """One venue's feed + merger (one book, one drained subscriber), minus the sockets:
    frames go in at Connection.message_received, as the websocket hands them over."""

    def __init__(self, case: VenueCase) -> None:
        from twisted.internet.task import Clock

        from aggregator.exchanges.feed import VenueFeed
        from aggregator.merger import Merger

        self.clock = Clock()
        self.clock.advance(1_700_000_000.0)
        self.feed = VenueFeed(case.adapter, "ws://ws.invalid", "http://rest.invalid",
                              reactor=self.clock, http=_Http(case.documents), connector=_no_socket)
        self.feed.startService()  # the symbol list loads at once from _Http
        self.merger = Merger([self.feed], depth=10)
        self.merger.startService()
        self.delivered = 0
        (symbol,) = self.feed.listed_symbols() or ()
        self._drain(self.merger.subscribe(symbol))
        self.clock.advance(0)  # demand → the connection
        (self.connection,) = self.feed.connections
        protocol = _Protocol()
        self.connection.connection_opened(protocol)
        self.clock.advance(1.0)  # the paced subscribe frames go out
        for reply in case.greet([orjson.loads(payload) for payload in protocol.sent]):
            self.connection.message_received(reply)
        self.book = self.feed.books[symbol]
        if not self.book.live:
            raise RuntimeError(f"{self.feed.name} path: the book did not go live")

    def _drain(self, subscription: Any) -> None:
        def got(summary: Any) -> None:
            if summary is not None:
                self.delivered += 1
                subscription.next().addCallback(got)

        subscription.next().addCallback(got)

    def run(self, frames: list[bytes]) -> float:
        """Seconds to push every frame through the path."""
        receive = self.connection.message_received
        perf = time.perf_counter
        start = perf()
        for frame in frames:
            receive(frame)
        return perf() - start


def measure_bitstamp(rounds: int, count: int) -> dict[str, Any]:
    """µs per `order_book_` message (100 levels a side, top 10 changed) through the daemon's
    Bitstamp path, and its floor: orjson's decode of the same messages."""
    document, frames = bitstamp_frames(count)
    case = recorded_bitstamp_case(document, frames)
    best = floor = float("inf")
    for _ in range(rounds):
        path = VenuePath(case)
        gc.collect()
        best = min(best, path.run(frames))
        if not path.book.live or path.delivered < len(frames):
            raise RuntimeError(f"bitstamp path: {path.delivered} Summaries for {len(frames)} messages")
        loads = orjson.loads
        perf = time.perf_counter
        start = perf()
        for frame in frames:
            loads(frame)
        floor = min(floor, perf() - start)
    return {"us_per_msg": best / count * 1e6, "floor_us_per_msg": floor / count * 1e6, "messages": count}


# -- every venue's own update message, the same level changes ---------------------------------
#
# Each venue starts from the same ladder (its channel's depth of it) and then receives the same
# level changes, each message CHANGED_LEVELS amounts within the top 10, written the way that
# venue writes a book change. The Binance diff is the reference the others are measured against.

VENUES = ("binance", "bitstamp", "bybit", "coinbase", "kraken")
CHANGED_LEVELS = 3
LADDER_LEVELS = 100  # a side: Bitstamp's whole-book message, Binance's smallest snapshot
BYBIT_DEPTH = 50  # the topic a served depth of 10 subscribes (bybit.topic_depth)
KRAKEN_DEPTH = 10  # the book depth a served depth of 10 subscribes (kraken.subscription_depth)
KRAKEN_DECIMALS = (2, 8)  # pair_decimals, lot_decimals: the ladder's text is at this precision
START_US = 1_700_000_000 * 1_000_000
Change = tuple[list[Level], list[Level]]


def ladder() -> tuple[list[Level], list[Level]]:
    """LADDER_LEVELS a side at a 0.01 tick around 2000, one size each, as text."""
    bids = [(f"{2000.00 - 0.01 * i:.2f}", f"{1 + i % 7 * 0.25:.8f}") for i in range(LADDER_LEVELS)]
    asks = [(f"{2000.01 + 0.01 * i:.2f}", f"{1 + i % 5 * 0.5:.8f}") for i in range(LADDER_LEVELS)]
    return bids, asks


def level_changes(count: int, seed: int = 11) -> list[Change]:
    """Per message, CHANGED_LEVELS distinct levels among the top 10 bids and top 10 asks given
    a new amount (never the one they hold: every message changes the top, so each makes a
    Summary).
    Prices stay: no level comes or goes, so every venue's book keeps its depth."""
    rng = random.Random(seed)
    bids, asks = (dict(side) for side in ladder())
    sides = (list(bids), list(asks))
    changes = []
    for _ in range(count):
        change: Change = ([], [])
        for pick in rng.sample(range(20), CHANGED_LEVELS):
            held = (bids, asks)[pick // 10]
            price = sides[pick // 10][pick % 10]
            size = held[price]
            while size == held[price]:
                size = f"{rng.randint(1, 10**9) / 1e8:.8f}"
            held[price] = size
            change[pick // 10].append((price, size))
        changes.append(change)
    return changes


def final_top(changes: list[Change]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """The top 10 a side every venue's book must show after all the changes."""
    bids, asks = (dict(side) for side in ladder())
    for changed_bids, changed_asks in changes:
        bids.update(changed_bids)
        asks.update(changed_asks)
    return ([(float(p), float(a)) for p, a in list(bids.items())[:10]],
            [(float(p), float(a)) for p, a in list(asks.items())[:10]])


def _decoded(document: dict) -> Any:
    """A REST answer as the HTTP client hands it over: decoded JSON (levels are lists)."""
    return orjson.loads(orjson.dumps(document))


def binance_case(changes: list[Change]) -> VenueCase:
    from aggregator.exchanges.binance import BinanceAdapter

    bids, asks = ladder()
    first_id = 1000
    snapshot = _decoded({"lastUpdateId": first_id, "bids": bids, "asks": asks})
    listing = {"rateLimits": [], "symbols": [
        {"symbol": "ETHUSD", "status": "TRADING", "baseAsset": "ETH", "quoteAsset": "USD"}]}

    def greet(sent: list[dict]) -> list[bytes]:
        # Acknowledged, the sync fetches its REST snapshot (answered at once): live.
        return [orjson.dumps({"result": None, "id": f["id"]}) for f in sent if f["method"] == "SUBSCRIBE"]

    frames = [orjson.dumps({"stream": "ethusd@depth@100ms", "data": {
        "e": "depthUpdate", "E": START_US // 1000 + k, "s": "ETHUSD", "U": first_id + k,
        "u": first_id + k, "b": b, "a": a}}) for k, (b, a) in enumerate(changes, 1)]
    return VenueCase(BinanceAdapter, lambda url: listing if "/exchangeInfo" in url else snapshot,
                     greet, frames)


def bitstamp_case(changes: list[Change]) -> VenueCase:
    from aggregator.exchanges.bitstamp import BitstampAdapter

    bids, asks = (dict(side) for side in ladder())
    info = {"url_symbol": "ethusd", "name": "ETH/USD", "trading": "Enabled"}
    snapshot = _decoded({"timestamp": str(START_US // 10**6), "microtimestamp": str(START_US),
                         "bids": list(bids.items()), "asks": list(asks.items())})
    frames = []
    for k, (changed_bids, changed_asks) in enumerate(changes, 1):
        # A whole book per change: the channel sends nothing else.
        bids.update(changed_bids)
        asks.update(changed_asks)
        frames.append(orjson.dumps({
            "data": {"timestamp": str((START_US + k) // 10**6), "microtimestamp": str(START_US + k),
                     "bids": list(bids.items()), "asks": list(asks.items())},
            "channel": "order_book_ethusd", "event": "data"}))
    return VenueCase(BitstampAdapter, lambda url: [info] if "trading-pairs-info" in url else snapshot,
                     _bitstamp_greet("ethusd"), frames)


def bybit_case(changes: list[Change]) -> VenueCase:
    from aggregator.exchanges.bybit import BybitAdapter

    bids, asks = ladder()
    topic = f"orderbook.{BYBIT_DEPTH}.ETHUSD"
    listing = {"retCode": 0, "retMsg": "OK", "result": {"category": "spot", "list": [
        {"symbol": "ETHUSD", "baseCoin": "ETH", "quoteCoin": "USD", "status": "Trading"}]}}
    first_u = 1000

    def message(kind: str, u: int, b: list[Level], a: list[Level]) -> bytes:
        return orjson.dumps({"topic": topic, "type": kind, "ts": START_US // 1000 + u,
                             "data": {"s": "ETHUSD", "b": b, "a": a, "u": u, "seq": u},
                             "cts": START_US // 1000 + u})

    def greet(sent: list[dict]) -> list[bytes]:
        # Acknowledged, then the topic's snapshot in band (the topic's depth of the ladder).
        acks = [orjson.dumps({"success": True, "ret_msg": "", "conn_id": "c1", "req_id": f["req_id"],
                              "op": f["op"]}) for f in sent if f.get("op") == "subscribe"]
        return [*acks, message("snapshot", first_u, bids[:BYBIT_DEPTH], asks[:BYBIT_DEPTH])]

    frames = [message("delta", first_u + k, b, a) for k, (b, a) in enumerate(changes, 1)]
    return VenueCase(BybitAdapter, lambda url: listing, greet, frames)


def coinbase_case(changes: list[Change]) -> VenueCase:
    from aggregator.exchanges.coinbase import CoinbaseAdapter

    bids, asks = ladder()
    listing = {"num_products": 1, "products": [
        {"product_id": "ETH-USD", "base_currency_id": "ETH", "quote_currency_id": "USD",
         "status": "online", "trading_disabled": False, "product_type": "SPOT", "alias": ""}]}

    def message(sequence: int, channel: str, events: list[dict]) -> bytes:
        # `sequence_num` numbers every message of the connection: the greeting's come first.
        return orjson.dumps({"channel": channel, "client_id": "", "timestamp": "2023-11-14T22:13:20Z",
                             "sequence_num": sequence, "events": events})

    def event(kind: str, b: list[Level], a: list[Level]) -> dict:
        return {"type": kind, "product_id": "ETH-USD", "updates": [
            *({"side": "bid", "event_time": "2023-11-14T22:13:20Z", "price_level": p, "new_quantity": q}
              for p, q in b),
            *({"side": "offer", "event_time": "2023-11-14T22:13:20Z", "price_level": p, "new_quantity": q}
              for p, q in a)]}

    def greet(sent: list[dict]) -> list[bytes]:
        return [message(0, "subscriptions", [{"subscriptions": {"level2": ["ETH-USD"]}}]),
                message(1, "l2_data", [event("snapshot", bids, asks)])]

    frames = [message(1 + k, "l2_data", [event("update", b, a)]) for k, (b, a) in enumerate(changes, 1)]
    return VenueCase(CoinbaseAdapter, lambda url: listing, greet, frames)


def kraken_case(changes: list[Change]) -> VenueCase:
    from aggregator.book import OrderBook
    from aggregator.exchanges.kraken import KrakenAdapter, order_book_checksum
    from aggregator.instruments import Instrument

    price_decimals, size_decimals = KRAKEN_DECIMALS
    instrument = Instrument("ETH/USD", "ETH", "USD", price_decimals, size_decimals)
    listing = {"error": [], "result": {"XETHZUSD": {
        "altname": "ETHUSD", "wsname": "ETH/USD", "base": "XETH", "quote": "ZUSD",
        "pair_decimals": price_decimals, "lot_decimals": size_decimals, "status": "online"}}}
    # The venue's own book, kept alongside: each message carries its checksum after the change.
    reference = OrderBook()

    def message(kind: str, b: list[Level], a: list[Level]) -> bytes:
        levels = ([(float(p), float(q)) for p, q in b], [(float(p), float(q)) for p, q in a])
        if kind == "snapshot":
            reference.replace(*levels)
        else:
            reference.apply(*levels)
        return orjson.dumps({"channel": "book", "type": kind, "data": [{
            "symbol": "ETH/USD",
            "bids": [{"price": p, "qty": q} for p, q in levels[0]],
            "asks": [{"price": p, "qty": q} for p, q in levels[1]],
            "checksum": order_book_checksum(reference, instrument),
            "timestamp": "2023-11-14T22:13:20.000000Z"}]})

    bids, asks = ladder()
    snapshot = message("snapshot", bids[:KRAKEN_DEPTH], asks[:KRAKEN_DEPTH])

    def greet(sent: list[dict]) -> list[bytes]:
        acks = [orjson.dumps({"method": "subscribe", "result": {
            "channel": "book", "depth": KRAKEN_DEPTH, "snapshot": True, "symbol": "ETH/USD",
            "warnings": []}, "success": True, "req_id": f["req_id"]})
            for f in sent if f["method"] == "subscribe"]
        return [*acks, snapshot]

    frames = [message("update", b, a) for b, a in changes]
    return VenueCase(KrakenAdapter, lambda url: listing, greet, frames)


def measure_venues(rounds: int, count: int) -> dict[str, Any]:
    """µs per steady-state update message of each venue, every one changing the same
    CHANGED_LEVELS levels, through the daemon's path for that venue; and each venue's ratio
    to the Binance diff. Rounds interleave the venues, so a noisy moment hits all of them."""
    changes = level_changes(count)
    top = final_top(changes)
    makers = {"binance": binance_case, "bitstamp": bitstamp_case, "bybit": bybit_case,
              "coinbase": coinbase_case, "kraken": kraken_case}
    cases = {venue: makers[venue](changes) for venue in VENUES}
    best = dict.fromkeys(VENUES, float("inf"))
    for _ in range(rounds):
        for venue, case in cases.items():
            path = VenuePath(case)
            gc.collect()
            best[venue] = min(best[venue], path.run(case.frames))
            _check_applied(venue, path, count, top)
    us = {venue: seconds / count * 1e6 for venue, seconds in best.items()}
    return {"us_per_msg": us, "ratio_to_binance": {v: us[v] / us["binance"] for v in VENUES},
            "messages": count, "changed_levels": CHANGED_LEVELS}


def _check_applied(venue: str, path: VenuePath, count: int, top: Any) -> None:
    """Every message applied and published, the book live at the end: a resync (a wrong
    checksum, a gap) would have timed a different path."""
    book = path.book
    shown = (book.book.top_bids(10), book.book.top_asks(10))
    if not book.live or path.delivered < count or shown != top:
        raise RuntimeError(f"{venue} path: live={book.live}, {path.delivered} Summaries for "
                           f"{count} messages, top {'as' if shown == top else 'not as'} expected")


def run(quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    synthetic = synthetic_sequence(symbols=50 if quick else 200, messages=5_000 if quick else 40_000)
    recorded = recorded_sequence()
    seq = combined(recorded, synthetic)
    result: dict[str, Any] = {
        "messages": len(seq.frames),
        "recorded_messages": len(recorded.frames),
        "synthetic_messages": len(synthetic.frames),
        "symbols": len(seq.snapshots),
        "rounds": rounds,
    }
    ours = measure_ours(seq, rounds)
    result["ours_us_per_msg"] = ours["us_per_msg"]
    result["ours_summaries"] = ours["summaries"]
    result["ours_recorded_us_per_msg"] = measure_ours(recorded, rounds)["us_per_msg"]
    result["floor_us_per_msg"] = measure_floor(seq, rounds)["us_per_msg"]
    bitstamp = measure_bitstamp(rounds, 500 if quick else 3000)
    result["bitstamp_us_per_msg"] = bitstamp["us_per_msg"]
    result["bitstamp_floor_us_per_msg"] = bitstamp["floor_us_per_msg"]
    # Short runs (tens of ms a venue): twice the rounds, for a steadier best of each.
    venues = measure_venues(2 * rounds, 1_000 if quick else 5_000)
    result["venue_us_per_msg"] = venues["us_per_msg"]
    result["venue_ratio_to_binance"] = venues["ratio_to_binance"]
    result["venue_messages"] = venues["messages"]
    result["venue_changed_levels"] = venues["changed_levels"]
    version = cryptofeed_version()
    result["cryptofeed_version"] = version
    if version is None:
        result["cryptofeed_skipped"] = "cryptofeed is not installed (pip install '.[bench]')"
        result["cryptofeed_us_per_msg"] = None
    else:
        try:
            cf = measure_cryptofeed(seq, rounds)
            result["cryptofeed_us_per_msg"] = cf["us_per_msg"]
            result["cryptofeed_recorded_us_per_msg"] = measure_cryptofeed(recorded, rounds)["us_per_msg"]
        except Exception as error:  # an incompatible cryptofeed: say so, do not fail the suite
            result["cryptofeed_skipped"] = f"cryptofeed {version} failed: {error!r}"
            result["cryptofeed_us_per_msg"] = None
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
