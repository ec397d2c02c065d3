"""Unit tests of the simulator's parts, driven by twisted.internet.task.Clock (no sockets)."""

from __future__ import annotations

import orjson
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from aggregator.simulator import SimulatorService
from aggregator.simulator import fixtures
from aggregator.simulator.binance import DepthHub, exchange_info_symbols, parse_stream
from aggregator.simulator.bitstamp import ChannelHub, parse_channel, pairs_info
from aggregator.simulator.market import Book, Market, fixed, zero_like
from aggregator.simulator.player import Player
from aggregator.simulator.recorded import RecordedSource
from aggregator.simulator.synthetic import FINITE_CHANGES, SYMBOLS, SyntheticSource


class FakeSocket:
    """Stands in for a websocket protocol: records what the hubs send."""

    def __init__(self) -> None:
        self.frames: list[dict] = []

    def sendPreparedMessage(self, prepared: bytes) -> None:
        self.frames.append(orjson.loads(prepared))


# ------------------------------------------------------------------ formatting, book, market


def test_fixed_and_zero_like():
    assert fixed(6000012, 2, 8) == "60000.12000000"
    assert fixed(5, 5, 8) == "0.00005000"
    assert fixed(1234, 6, 8) == "0.00123400"
    assert fixed(7, 0, 0) == "7"
    assert fixed(0, 0, 5) == "0.00000"
    with pytest.raises(ValueError):
        fixed(1, 3, 2)
    assert zero_like("3800.71000000") == "0.00000000"
    assert zero_like("1.23456") == "0.00000"
    assert zero_like("12") == "0"


def test_book_apply_and_order():
    book = Book([("10.0", "1"), ("9.5", "2")], [("11", "3"), ("10.5", "4")])
    assert book.floats() == ([(10.0, 1.0), (9.5, 2.0)], [(10.5, 4.0), (11.0, 3.0)])
    # Zero deletes whatever its decimals; deleting an absent level is fine; same price with
    # other trailing zeros is the same level.
    book.apply([("10.00", "0.00000"), ("9.50000000", "5"), ("1", "0")], [])
    assert book.floats()[0] == [(9.5, 5.0)]
    assert book.levels()[0] == [("9.50000000", "5")]
    assert not book.crossed()
    book.apply([("10.5", "1")], [])
    assert book.crossed()


def test_book_changes_to():
    start = Book([("10", "1"), ("9", "2")], [("11", "3")])
    book = start.copy()
    book.apply([("10", "0"), ("8", "7"), ("9", "2.5")], [("11", "3"), ("12", "1")])
    bids, asks = book.changes_to(start, "0.000")
    book.apply(bids, asks)
    assert book.floats() == start.floats()
    assert ("8", "0.000") in bids and ("12", "0.000") in asks
    # Unchanged levels are not repeated.
    assert ("11", "3") not in asks


def test_market_ids_and_microtimestamps():
    clock = Clock()
    clock.advance(1000.5)
    market = Market("binance", "x", clock.seconds, Book([("1", "1")], [("2", "1")]), 41)
    seen = []
    market.subscribe(seen.append)
    u1 = market.apply([("1.5", "2"), ("1.5", "3")], [("2", "0")])  # duplicate price: last wins
    u2 = market.apply([("1", "4")], [], span=3)
    assert market.apply([], []) is None  # never an empty event
    assert (u1.first_id, u1.last_id, u2.first_id, u2.last_id) == (42, 43, 44, 46)
    assert u1.bids == (("1.5", "3"),) and u1.asks == (("2", "0"),)
    # Same reactor time as the creation stamp: still strictly increasing.
    assert u1.microtimestamp == 1000500001 and u2.microtimestamp == 1000500002
    assert seen == [u1, u2]
    assert market.last_update_id == 46


# ------------------------------------------------------------------ player


def test_player_timing_speed_pause_and_end():
    clock = Clock()
    ran: list[float] = []
    script = [(t, lambda t=t: ran.append(clock.seconds())) for t in (0.0, 1.0, 1.0, 3.0)]
    player = Player(clock, script, speed=2.0)
    player.start()
    clock.advance(0)
    assert ran == [0.0]
    clock.advance(0.5)  # script time 1.0 at speed 2
    assert ran == [0.0, 0.5, 0.5]
    player.pause()
    clock.advance(10)
    assert len(ran) == 3 and not player.finished
    player.resume()  # resumes at script time 1.0: the last step is 1 s of reactor time away
    clock.advance(0.99)
    assert len(ran) == 3
    clock.advance(0.01)
    assert ran[-1] == pytest.approx(11.5) and player.finished
    assert clock.getDelayedCalls() == []


def test_player_catches_up_many_steps_in_one_timer():
    clock = Clock()
    count = []
    player = Player(clock, ((n / 1000.0, lambda: count.append(1)) for n in range(5000)), speed=1.0)
    player.start()
    clock.advance(5.0)
    assert len(count) == 5000 and player.finished


# ------------------------------------------------------------------ synthetic source


def _advance(clock: Clock, seconds: float, step: float = 0.05) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_synthetic_books_are_realistic_and_uncrossed():
    clock = Clock()
    source = SyntheticSource(clock, seed=3)
    assert {s for _, s in source.markets} == set(SYMBOLS)
    levels_per_event = []
    for market in source.markets.values():
        bids, asks = market.book.depth()
        assert bids >= 50 and asks >= 50
        market.subscribe(lambda u: levels_per_event.append(len(u.bids) + len(u.asks)))
    source.start()
    for _ in range(100):
        clock.advance(0.1)
        for market in source.markets.values():
            assert not market.book.crossed()
            assert min(market.book.depth()) >= 1
    source.stop()
    # ~10 changes per second per exchange+symbol, each touching 1-5 levels.
    assert len(levels_per_event) == pytest.approx(10 * 10 * len(source.markets), rel=0.02)
    assert set(levels_per_event) <= {1, 2, 3, 4, 5}
    mids = {
        (e, s): sum(m.book.best()) / 2  # type: ignore[arg-type]
        for (e, s), m in source.markets.items()
    }
    assert mids[("binance", "btcusdt")] == pytest.approx(60000, rel=0.01)
    assert mids[("bitstamp", "ethbtc")] == pytest.approx(0.05, rel=0.05)
    assert mids[("binance", "ltcbtc")] == pytest.approx(0.0015, rel=0.05)
    # Same fair value: the two exchanges quote close to each other.
    assert mids[("binance", "ethusdt")] == pytest.approx(mids[("bitstamp", "ethusdt")], rel=0.001)


def test_synthetic_string_formats_per_exchange():
    source = SyntheticSource(Clock(), seed=1)
    bin_bids, _ = source.markets[("binance", "btcusdt")].book.levels(1)
    bts_bids, _ = source.markets[("bitstamp", "btcusdt")].book.levels(1)
    price, amount = bin_bids[0]
    assert len(price.split(".")[1]) == 8 and len(amount.split(".")[1]) == 8
    price, amount = bts_bids[0]
    assert len(price.split(".")[1]) == 2 and len(amount.split(".")[1]) == 8  # counter/base decimals
    eth_bid = source.markets[("binance", "ethbtc")].book.levels(1)[0][0][0]
    assert round(float(eth_bid) / 0.00001, 6) == round(float(eth_bid) / 0.00001)  # on the tick


def test_synthetic_determinism():
    def books(seed: int, seconds: float) -> dict:
        clock = Clock()
        source = SyntheticSource(clock, seed=seed)
        source.start()
        _advance(clock, seconds)
        return {key: (m.last_update_id, m.book.levels()) for key, m in source.markets.items()}

    assert books(5, 3.0) == books(5, 3.0)
    assert books(5, 3.0) != books(6, 3.0)


def test_synthetic_content_does_not_depend_on_speed():
    # The n-th change depends on the seed and n only: at 10x speed, 1 s == 10 s at speed 1.
    a, b = Clock(), Clock()
    slow, fast = SyntheticSource(a, seed=9), SyntheticSource(b, seed=9, speed=10.0)
    slow.start()
    fast.start()
    _advance(a, 10.0)
    _advance(b, 1.0, step=0.005)
    for key in slow.markets:
        assert slow.markets[key].book.levels() == fast.markets[key].book.levels()


def test_synthetic_no_loop_stops_after_finite_changes():
    clock = Clock()
    source = SyntheticSource(clock, seed=1, speed=50.0, loop=False)
    start_ids = {k: m.last_update_id for k, m in source.markets.items()}
    counts = dict.fromkeys(source.markets, 0)
    for key, market in source.markets.items():
        market.subscribe(lambda u, key=key: counts.__setitem__(key, counts[key] + 1))
    source.start()
    _advance(clock, 1.0)
    assert source.finished
    assert set(counts.values()) == {FINITE_CHANGES}
    assert all(m.last_update_id > start_ids[k] for k, m in source.markets.items())
    assert clock.getDelayedCalls() == []


def test_pause_and_resume():
    clock = Clock()
    source = SyntheticSource(clock, seed=1)
    source.start()
    clock.advance(0.5)
    market = source.markets[("binance", "ethbtc")]
    source.pause()
    frozen = market.last_update_id
    _advance(clock, 2.0)
    assert market.last_update_id == frozen
    source.resume()
    _advance(clock, 0.5)
    assert market.last_update_id > frozen
    source.stop()
    assert clock.getDelayedCalls() == []


# ------------------------------------------------------------------ fixtures and recorded source


def test_fixture_line_grammar():
    line = fixtures.parse_line('1641343697.40338: {"event":"x","data":{"a": "b"}}')
    assert (line.kind, line.ts, line.body) == ("recv", 1641343697.40338, '{"event":"x","data":{"a": "b"}}')
    line = fixtures.parse_line('wss://ws.bitstamp.net/ <- 1641343691.06: {"event":"bts:subscribe"}')
    assert (line.kind, line.url, line.body) == ("sent", "wss://ws.bitstamp.net/", '{"event":"bts:subscribe"}')
    line = fixtures.parse_line("wss://stream.binance.com:9443/stream?streams=a <-> 1633998511.159679")
    assert (line.kind, line.ts) == ("open", 1633998511.159679)
    line = fixtures.parse_line('https://x/api -> 1.5: {"k": "v"}')
    assert (line.kind, line.url, line.body) == ("http", "https://x/api", '{"k": "v"}')
    assert fixtures.parse_line('configuration: {"a":1}').kind == "config"


def test_recordings_match_protocols_tables():
    binance = fixtures.binance_recording()
    assert {s: x.last_update_id for s, x in binance.snapshots.items()} == {
        "nknusdt": 499869752,
        "blzeth": 281916627,
        "lrcbtc": 259345543,
        "runeeur": 15602511,
    }
    assert {s: len(d) for s, d in binance.diffs.items()} == {"nknusdt": 150, "lrcbtc": 15, "blzeth": 10, "runeeur": 2}
    assert len(binance.exchange_info["symbols"]) == 1695
    bitstamp = fixtures.bitstamp_recording()
    assert {p: len(d) for p, d in bitstamp.diffs.items()} == {
        "bateur": 89,
        "ethusd": 85,
        "usdtusd": 74,
        "xrpeur": 70,
        "adaeur": 62,
    }
    assert len(bitstamp.snapshots["ethusd"].bids) == 2023 and len(bitstamp.pairs_info) == 140


def _independent_recorded_books() -> dict[tuple[str, str], tuple[dict, dict, int]]:
    """Snapshot + diffs per PROTOCOLS §1.7/§2.4, parsed here without the simulator's parser."""
    root = fixtures.resources.files("aggregator.simulator").joinpath("fixtures")

    def lines(name: str) -> list[tuple[str, str]]:
        out = []
        for text in root.joinpath(name).read_text().split("\n"):
            if text and not text.startswith("configuration: "):
                head, _, body = text.partition(": ")
                out.append((head, body))
        return out

    def apply(side: dict, levels: list) -> None:
        for p, a in levels:
            if float(a) == 0:
                side.pop(float(p), None)
            else:
                side[float(p)] = float(a)

    books = {}
    for head, body in lines("BINANCE.http.0.0"):
        symbol = head.split("symbol=")[1].split("&")[0].lower()
        snap = orjson.loads(body)
        bids, asks = {}, {}
        apply(bids, snap["bids"])
        apply(asks, snap["asks"])
        books[("binance", symbol)] = (bids, asks, snap["lastUpdateId"])
    for _, body in lines("BINANCE.ws.1.0"):
        data = orjson.loads(body).get("data", {}) if body else {}
        if data.get("e") == "depthUpdate":
            bids, asks, last = books[("binance", data["s"].lower())]
            if data["u"] > last:
                assert data["U"] == last + 1  # no gaps in the recording
                apply(bids, data["b"])
                apply(asks, data["a"])
                books[("binance", data["s"].lower())] = (bids, asks, data["u"])
    for head, body in lines("BITSTAMP.http.0.0"):
        pair = head.split(" ")[0].rstrip("/").rsplit("/", 1)[1]
        snap = orjson.loads(body)
        bids, asks = {}, {}
        apply(bids, snap["bids"])
        apply(asks, snap["asks"])
        books[("bitstamp", pair)] = (bids, asks, int(snap["microtimestamp"]))
    for head, body in lines("BITSTAMP.ws.1.0"):
        if head.startswith("wss://"):
            continue
        frame = orjson.loads(body)
        channel = frame.get("channel", "")
        if frame.get("event") == "data" and channel.startswith("diff_order_book_"):
            key = ("bitstamp", channel[len("diff_order_book_") :])
            bids, asks, s = books[key]
            if int(frame["data"]["microtimestamp"]) > s:
                apply(bids, frame["data"]["bids"])
                apply(asks, frame["data"]["asks"])
    return books


def _as_lists(bids: dict, asks: dict) -> tuple[list, list]:
    return sorted(bids.items(), reverse=True), sorted(asks.items())


def test_recorded_single_pass_reproduces_the_recording():
    clock = MemoryReactorClock()
    sim = SimulatorService(reactor=clock, source="recorded", speed=100.0, loop=False)
    assert sim.symbols("binance") == ["blzeth", "lrcbtc", "nknusdt", "runeeur"]
    assert sim.symbols("bitstamp") == ["adaeur", "bateur", "ethusd", "sgbeur", "usdtusd", "xrpeur"]
    sim.startService()
    assert not sim.finished
    _advance(clock, 1.0)  # 100 s of recording
    assert sim.finished
    expected = _independent_recorded_books()
    for (exchange, symbol), (bids, asks, _) in expected.items():
        assert sim.true_book(exchange, symbol) == _as_lists(bids, asks), (exchange, symbol)
        assert not sim.market(exchange, symbol).book.crossed()
    for symbol in sim.symbols("binance"):
        # The first pass reproduces the recorded update ids exactly (§3.3).
        assert sim.market("binance", symbol).last_update_id == expected[("binance", symbol)][2]
    sim.stopService()
    assert clock.getDelayedCalls() == []


def test_recorded_looping_resets_to_snapshot_with_contiguous_ids():
    clock = Clock()
    source = RecordedSource(clock, speed=100.0, loop=True)
    replay = source.replays[("binance", "lrcbtc")]
    market = replay.market
    snapshot = replay.initial.floats()
    n = len(replay.items)
    updates = []
    books_after = []
    market.subscribe(lambda u: (updates.append(u), books_after.append(market.book.floats())))
    bitstamp = source.replays[("bitstamp", "usdtusd")]
    bitstamp_updates = []
    bitstamp.market.subscribe(bitstamp_updates.append)
    source.start()
    _advance(clock, 1.0, step=0.01)  # several passes of lrcbtc (22.4 s + 1 s each)
    source.stop()
    assert replay.passes >= 3 and len(updates) >= 3 * (n + 1)
    # Update n is the reset: the book is the initial snapshot again.
    assert books_after[n] == snapshot
    assert books_after[2 * n + 1] == snapshot
    # Every pass ends in the same book.
    assert books_after[n - 1] == books_after[2 * n] == books_after[3 * n + 1]
    # Ids contiguous across passes and resets; the first pass keeps the recorded ids.
    assert updates[0].first_id == 259345544 and updates[n - 1].last_id == 259345563
    for a, b in zip(updates, updates[1:]):
        assert b.first_id == a.last_id + 1
    # Bitstamp: microtimestamps strictly increasing across passes.
    stamps = [u.microtimestamp for u in bitstamp_updates]
    assert len(stamps) > 2 * len(bitstamp.items) and stamps == sorted(set(stamps))


# ------------------------------------------------------------------ protocol hubs (no sockets)


def test_stream_and_channel_names():
    assert parse_stream("btcusdt@depth@100ms") == ("btcusdt", 0.1)
    assert parse_stream("btcusdt@depth") == ("btcusdt", 1.0)
    for bad in ("BTCUSDT@depth", "btcusdt@depth5", "btcusdt@trade", "btcusdt", "", None, 5):
        assert parse_stream(bad) is None
    assert parse_channel("diff_order_book_ethusd") == ("diff_order_book", "ethusd")
    assert parse_channel("order_book_ethusd") == ("order_book", "ethusd")
    for bad in ("order_book_", "orderbook_ethusd", "order_book_ETHUSD", "diff_order_book_eth-usd", None):
        assert parse_channel(bad) is None


def test_depth_hub_flush_cadence_and_conflation():
    clock = Clock()
    market = Market("binance", "abc", clock.seconds, Book([("1.0", "1")], [("2.0", "1")]), 100)
    hub = DepthHub({"abc": market}, clock)
    fast, slow, other = FakeSocket(), FakeSocket(), FakeSocket()
    hub.subscribe(fast, "abc@depth@100ms")
    hub.subscribe(slow, "abc@depth")
    hub.subscribe(other, "abc@depth@100ms")
    hub.subscribe(other, "zzz@depth@100ms")  # unknown symbol: accepted, silent
    hub.start()
    clock.advance(0.01)
    market.apply([("1.0", "5")], [("2.5", "1")])  # ids 101-102
    clock.advance(0.04)
    market.apply([("1.0", "6")], [], span=3)  # ids 103-105; conflated with the first
    clock.advance(0.05)  # t = 0.1: flush
    assert fast.frames == other.frames
    assert fast.frames == [
        {
            "stream": "abc@depth@100ms",
            "data": {
                "e": "depthUpdate",
                "E": 100,
                "s": "ABC",
                "U": 101,
                "u": 105,
                "b": [["1.0", "6"]],
                "a": [["2.5", "1"]],
            },
        }
    ]
    clock.advance(0.1)  # nothing changed: nothing sent
    assert len(fast.frames) == 1
    market.apply([("0.5", "1")], [("2.5", "0")])
    clock.advance(0.1)
    assert [(f["data"]["U"], f["data"]["u"]) for f in fast.frames] == [(101, 105), (106, 107)]
    assert slow.frames == []
    clock.advance(0.7)  # t = 1.0: the 1000 ms stream gets everything since its last flush
    assert len(slow.frames) == 1
    data = slow.frames[0]["data"]
    assert slow.frames[0]["stream"] == "abc@depth" and (data["U"], data["u"]) == (101, 107)
    assert data["b"] == [["1.0", "6"], ["0.5", "1"]] and data["a"] == [["2.5", "0"]]
    # Unsubscribed sockets get nothing more; the last one out stops the accumulation.
    hub.unsubscribe(fast, "abc@depth@100ms")
    hub.drop(other, ["abc@depth@100ms", "zzz@depth@100ms"])
    market.apply([("0.5", "2")], [])
    clock.advance(0.1)
    assert len(fast.frames) == 2 and len(other.frames) == 2
    hub.stop()
    assert clock.getDelayedCalls() == []


def test_channel_hub_frames():
    clock = Clock()
    clock.advance(1641343691.5)
    bids = [(f"{100 - i}.00", "1.00000000") for i in range(150)]
    asks = [(f"{101 + i}.00", "2.00000000") for i in range(150)]
    market = Market("bitstamp", "ethusd", clock.seconds, Book(bids, asks), 0)
    hub = ChannelHub({"ethusd": market})
    diff, full = FakeSocket(), FakeSocket()
    hub.subscribe(diff, "diff_order_book_ethusd")
    hub.subscribe(full, "order_book_ethusd")
    hub.start()
    assert diff.frames == [] and full.frames == []  # nothing on subscribe
    clock.advance(0.25)
    market.apply([("100.00", "0.00000000")], [("100.50", "3.00000000")])
    assert diff.frames == [
        {
            "data": {
                "timestamp": "1641343691",
                "microtimestamp": "1641343691750000",
                "bids": [["100.00", "0.00000000"]],
                "asks": [["100.50", "3.00000000"]],
            },
            "channel": "diff_order_book_ethusd",
            "event": "data",
        }
    ]
    data = full.frames[0]["data"]
    assert len(data["bids"]) == len(data["asks"]) == 100
    assert data["bids"][0] == ["99.00", "1.00000000"] and data["asks"][0] == ["100.50", "3.00000000"]
    assert data["microtimestamp"] == "1641343691750000"
    market.apply([("99.00", "2.00000000")], [])
    assert int(diff.frames[1]["data"]["microtimestamp"]) > int(diff.frames[0]["data"]["microtimestamp"])
    hub.stop()
    market.apply([("98.00", "2.00000000")], [])
    assert len(diff.frames) == 2


def test_listing_entries():
    entries = exchange_info_symbols(["ethbtc", "nknusdt"])
    assert [(e["symbol"], e["status"]) for e in entries[:2]] == [("ETHBTC", "TRADING"), ("NKNUSDT", "TRADING")]
    assert entries[2]["status"] == "BREAK" and entries[2]["symbol"] not in ("ETHBTC", "NKNUSDT")
    assert {"baseAsset", "quoteAsset", "filters"} <= set(entries[0])
    assert entries[0]["baseAsset"] == "ETH" and entries[0]["quoteAsset"] == "BTC"
    pairs = pairs_info(["usdtusd", "ethbtc"])
    assert [p["name"] for p in pairs] == ["ETH/BTC", "USDT/USD"]
    assert pairs[1]["base_decimals"] == 5 and pairs[1]["trading"] == "Enabled"


def test_service_determinism_and_clean_stop():
    def run(seed: int) -> tuple[dict, MemoryReactorClock]:
        clock = MemoryReactorClock()
        sim = SimulatorService(reactor=clock, source="both", seed=seed, loop=True)
        sim.startService()
        _advance(clock, 2.0)
        books = {(e, s): sim.true_book(e, s) for e in ("binance", "bitstamp") for s in sim.symbols(e)}
        sim.stopService()
        return books, clock

    a, clock = run(11)
    assert clock.getDelayedCalls() == []  # players, flush loops, all stopped
    b, _ = run(11)
    c, _ = run(12)
    assert a == b
    assert any(a[k] != c[k] for k in a if k[1] in SYMBOLS)


def test_service_arguments():
    with pytest.raises(ValueError):
        SimulatorService(reactor=MemoryReactorClock(), source="live")
    with pytest.raises(ValueError):
        SimulatorService(reactor=MemoryReactorClock(), ports={"nosuchvenue_ws": 1})
    sim = SimulatorService(reactor=MemoryReactorClock(), source="synthetic")
    assert sim.symbols("bitstamp") == sorted(SYMBOLS)
    assert sim.symbols("binance") == sorted(set(SYMBOLS) - {"btcusd"})
    bids, asks = sim.true_book("bitstamp", "btceur")
    assert bids[0][0] < asks[0][0] and len(bids) >= 50


def test_rest_site_times_out_idle_clients_without_a_log_line():
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.logger import globalLogPublisher
    from twisted.web.resource import Resource

    from aggregator.simulator.rest import QuietSite

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = MemoryReactorClock()
        site = QuietSite(Resource(), reactor=clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        clock.advance(site.timeOut + 1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.disconnecting  # timed out
    assert not [e for e in events if "out client" in e.get("log_format", "")]


def test_subscribing_and_unsubscribing_log_nothing():
    import orjson
    from twisted.logger import globalLogPublisher

    from tests.test_simulator_faults import _Conn, clocked

    events: list[dict] = []
    with clocked(source="synthetic") as (sim, clock):
        globalLogPublisher.addObserver(events.append)
        try:
            binance = _Conn(sim._venues["binance"].ws, b"/stream?streams=ethbtc@depth@100ms")
            for method in ("SUBSCRIBE", "UNSUBSCRIBE"):
                binance.send(1, orjson.dumps({"method": method, "params": ["btcusdt@depth"], "id": 1}))
            bitstamp = _Conn(sim._venues["bitstamp"].ws, b"/")
            for event in ("bts:subscribe", "bts:unsubscribe"):
                bitstamp.send(1, orjson.dumps({"event": event, "data": {"channel": "order_book_ethbtc"}}))
            clock.advance(1)
        finally:
            globalLogPublisher.removeObserver(events.append)
    assert len(binance.received()) >= 2 and len(bitstamp.received()) == 2
    assert [e["log_format"] for e in events if e.get("log_namespace", "").startswith("aggregator.simulator")] == []
