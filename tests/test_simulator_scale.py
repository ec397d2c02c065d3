"""Scale mode: many generated symbols at a given total rate (Clock-driven, plus one loopback test)."""

from __future__ import annotations

import time
from collections import Counter

import orjson
import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock

from aggregator.simulator import SimulatorService
from aggregator.simulator.binance import SEND_TIME_FIELD
from aggregator.simulator.scale import (
    FINITE_CHANGES,
    MAX_BACKLOG,
    VenueLoad,
    heavy_tailed_rates,
    scale_symbol_names,
)

from tests.simclient import TIMEOUT, Reference, connect, get, running, sleep
from tests.test_simulator_faults import _Conn, clocked


def _data_frames(conn: _Conn) -> list[dict]:
    return [orjson.loads(p) for op, p in conn.received() if op == 1]


def test_scale_rate_ids_send_time_and_true_book_on_the_clock():
    with clocked(source="scale", symbols=30, rate=1000.0, tick=0.005) as (sim, clock):
        names = scale_symbol_names(30)
        assert sim.symbols("binance") == sim.symbols("bitstamp") == names
        initial = {s: sim.market("binance", s).book.levels() for s in names}
        first_ids = {s: sim.market("binance", s).last_update_id for s in names}
        streams = "/".join(f"{s}@depth@100ms" for s in names)
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=" + streams.encode())
        bitstamp = _Conn(sim._venues["bitstamp"].ws, b"/")
        for pair in names[:3]:
            bitstamp.send(1, orjson.dumps({"event": "bts:subscribe", "data": {"channel": "order_book_" + pair}}))
        bitstamp.received()
        heard: list[tuple[str, str]] = []
        sim.add_frame_listener(lambda exchange, symbol, frame: heard.append((exchange, symbol)))
        frames = []
        started = time.time()
        for _ in range(200):  # one second in 5 ms ticks
            clock.advance(0.005)
            frames += _data_frames(conn)
        stats = sim.scale_stats()
        assert stats["binance"]["generated"] == 1000 and stats["binance"]["skipped"] == 0
        assert stats["bitstamp"]["generated"] == 100  # default: a tenth of the Binance rate
        # One frame per change event, immediately (no 100 ms conflation).
        assert len(frames) == 1000 == sim.frames_sent("binance")
        assert sum(sim.frames_sent("binance", s) for s in names) == 1000
        assert len([e for e, _ in heard if e == "binance"]) == 1000
        assert {s for e, s in heard if e == "bitstamp"} <= set(names[:3])
        books = {s: Reference(*initial[s]) for s in names}
        last = dict(first_ids)
        for frame in frames:
            data = frame["data"]
            symbol = data["s"].lower()
            assert frame["stream"] == f"{symbol}@depth@100ms" and data["e"] == "depthUpdate"
            assert data["U"] == last[symbol] + 1 and data["u"] >= data["U"]  # contiguous
            last[symbol] = data["u"]
            assert 1 <= len(data["b"]) + len(data["a"]) <= 5
            assert started - 1 <= data[SEND_TIME_FIELD] <= time.time() + 1
            assert all(len(p.split(".")[1]) == 8 and len(a.split(".")[1]) == 8 for p, a in data["b"] + data["a"])
            books[symbol].apply(data["b"], data["a"])
        for symbol in names:
            bids, asks = sim.true_book("binance", symbol)
            assert books[symbol].lists() == (bids, asks)
            assert bids[0][0] < asks[0][0] and len(bids) >= 20 and len(asks) >= 20
            assert last[symbol] == sim.market("binance", symbol).last_update_id
        # Bitstamp order_book_ frames: the full top 100 of the true book.
        full = [orjson.loads(p) for op, p in bitstamp.received() if op == 1]
        assert full and {f["channel"] for f in full} <= {"order_book_" + p for p in names[:3]}
        latest = {f["channel"]: f["data"] for f in full}
        for channel, data in latest.items():
            bids, asks = sim.true_book("bitstamp", channel.removeprefix("order_book_"))
            assert Reference(data["bids"], data["asks"]).lists() == (bids[:100], asks[:100])
        conn.lose()
        bitstamp.lose()


def test_scale_determinism_backlog_pause_and_finite_run():
    def books(seed: int) -> dict:
        with clocked(source="scale", symbols=10, rate=500.0, seed=seed) as (sim, clock):
            for _ in range(100):
                clock.advance(0.01)
            return {s: sim.true_book("binance", s) for s in sim.symbols("binance")}

    assert books(5) == books(5) != books(6)

    with clocked(source="scale", symbols=10, rate=1000.0) as (sim, clock):
        clock.advance(1.0)  # one very late tick: at most MAX_BACKLOG seconds are caught up
        stats = sim.scale_stats()["binance"]
        assert stats["generated"] == int(1000 * MAX_BACKLOG) and stats["skipped"] == 1000 - stats["generated"]
        sim.pause()
        before = sim.scale_stats()["binance"]["generated"]
        for _ in range(50):
            clock.advance(0.01)
        assert sim.scale_stats()["binance"]["generated"] == before
        sim.resume()
        for _ in range(10):
            clock.advance(0.01)
        assert sim.scale_stats()["binance"]["generated"] == before + 100

    with clocked(source="scale", symbols=2, rate=400.0, loop=False) as (sim, clock):
        for _ in range(300):
            clock.advance(0.01)
        assert sim.finished
        assert sim.scale_stats()["binance"]["generated"] == FINITE_CHANGES * 2
        books = {s: sim.true_book("binance", s) for s in sim.symbols("binance")}
        clock.advance(1.0)
        assert books == {s: sim.true_book("binance", s) for s in sim.symbols("binance")}


def test_scale_arguments():
    clock = MemoryReactorClock()
    with pytest.raises(ValueError):
        SimulatorService(reactor=clock, source="scale", symbols=0)
    with pytest.raises(ValueError):
        SimulatorService(reactor=clock, source="scale", rate=0)
    sim = SimulatorService(reactor=clock, source="scale", symbols=3, rate=10.0, bitstamp_rate=0.0)
    assert sim.scale_stats()["bitstamp"]["rate"] == 0.0
    assert SimulatorService(reactor=clock, source="synthetic").scale_stats() is None


def test_heavy_tailed_rates_total_cap_seed_and_quiet_majority():
    rates = heavy_tailed_rates(1, "binance", 1500, 6000.0, 10.0)
    assert len(rates) == 1500 and sum(rates) == pytest.approx(6000.0)
    assert max(rates) == 10.0 and min(rates) > 0
    assert rates == sorted(rates, reverse=True)  # busiest first: the names are ranks
    # Heavy-tailed: a minority at the cap, most symbols well under the mean rate (4/s).
    assert 50 <= rates.count(10.0) <= 500
    median = sorted(rates)[len(rates) // 2]
    assert median < 0.6 * 4.0
    assert sum(r < 1.0 for r in rates) >= 150
    assert heavy_tailed_rates(1, "binance", 1500, 6000.0, 10.0) == rates
    assert heavy_tailed_rates(2, "binance", 1500, 6000.0, 10.0) != rates
    assert heavy_tailed_rates(1, "bybit", 1500, 6000.0, 10.0) != rates
    # Exactly the cap for everyone, and more than fits.
    assert heavy_tailed_rates(1, "kraken", 10, 100.0, 10.0) == [10.0] * 10
    with pytest.raises(ValueError):
        heavy_tailed_rates(1, "kraken", 10, 101.0, 10.0)


def count_events(sim: SimulatorService, names: list[str]) -> Counter[str]:
    """Binance change events per symbol from now on (counted as the markets apply them)."""
    counts: Counter[str] = Counter()
    for symbol in names:
        sim.market("binance", symbol).subscribe(lambda update, symbol=symbol: counts.update((symbol,)))
    return counts


def test_scale_loads_list_per_venue_and_draw_in_proportion():
    loads = {"binance": VenueLoad(200, 800.0, 10.0), "bitstamp": VenueLoad(20, 40.0)}
    with clocked(source="scale", symbols=200, scale_loads=loads, seed=3) as (sim, clock):
        names = scale_symbol_names(200)
        assert sim.symbols("binance") == names and sim.symbols("bitstamp") == names[:20]
        assert sim.symbols("bybit") == sim.symbols("kraken") == sim.symbols("coinbase") == []
        rates = sim._scale.symbol_rates
        assert rates["bitstamp"] == {s: 2.0 for s in names[:20]}
        assert sum(rates["binance"].values()) == pytest.approx(800.0) and max(rates["binance"].values()) == 10.0
        counts = count_events(sim, names)
        for _ in range(1000):  # ten seconds in 10 ms ticks
            clock.advance(0.01)
        stats = sim.scale_stats()
        # (Ten seconds of 10 ms steps add up to a hair under 10 s in floating point.)
        assert 7990 <= stats["binance"]["generated"] <= 8000 and 398 <= stats["bitstamp"]["generated"] <= 400
        assert stats["bybit"]["generated"] == 0
        busy = [s for s in names if rates["binance"][s] == 10.0]
        quiet = names[-50:]
        assert sum(counts[s] for s in busy) == pytest.approx(100 * len(busy), rel=0.1)
        assert sum(counts[s] for s in quiet) == pytest.approx(10 * sum(rates["binance"][s] for s in quiet), rel=0.25)
    # The same seed, the same books.
    with clocked(source="scale", symbols=200, scale_loads=loads, seed=3) as (sim2, clock2):
        again = count_events(sim2, names)
        for _ in range(1000):
            clock2.advance(0.01)
        assert again == counts
    clock = MemoryReactorClock()
    with pytest.raises(ValueError):
        SimulatorService(reactor=clock, source="scale", symbols=10, scale_loads={"binance": VenueLoad(11, 10.0)})
    with pytest.raises(ValueError):
        SimulatorService(reactor=clock, source="scale", symbols=10, scale_loads={"nyse": VenueLoad(5, 10.0)})


@pytest_twisted.ensureDeferred
async def test_scale_over_loopback_listing_frames_and_sync():
    async with running(source="scale", symbols=20, rate=2000.0, seed=2) as sim:
        code, _, body = await get(sim.urls["binance_rest_url"] + "/api/v3/exchangeInfo")
        entries = {e["symbol"]: e for e in orjson.loads(body)["symbols"] if e["status"] == "TRADING"}
        assert sorted(s.lower() for s in entries) == scale_symbol_names(20)
        entry = entries["S0007USDT"]
        assert (entry["baseAsset"], entry["quoteAsset"]) == ("S0007", "USDT")
        tick = next(f["tickSize"] for f in entry["filters"] if f["filterType"] == "PRICE_FILTER")
        code, _, body = await get(sim.urls["bitstamp_rest_url"] + "/api/v2/trading-pairs-info/")
        pairs = {p["url_symbol"]: p for p in orjson.loads(body)}
        assert sorted(pairs) == scale_symbol_names(20)
        assert pairs["s0007usdt"]["name"] == "S0007/USDT" and pairs["s0007usdt"]["trading"] == "Enabled"
        assert pairs["s0007usdt"]["counter_decimals"] == len(tick.rstrip("0").split(".")[1] or "")

        symbol = "s0007usdt"
        client = await connect(sim.urls["binance_ws_url"] + "/stream")
        client.send({"method": "SUBSCRIBE", "params": [f"{symbol}@depth@100ms"], "id": 1})
        assert await client.next() == {"result": None, "id": 1}
        first = await client.next_data()
        assert abs(first["data"][SEND_TIME_FIELD] - time.time()) < 1.0
        code, headers, body = await get(sim.urls["binance_rest_url"] + f"/api/v3/depth?symbol={symbol.upper()}&limit=1000")
        snap = orjson.loads(body)
        assert headers.getRawHeaders("x-mbx-used-weight-1m") == ["70"]  # 20 + 50
        await sleep(0.2)
        sim.pause()
        target = sim.market("binance", symbol).last_update_id
        book = Reference(snap["bids"], snap["asks"])
        last = snap["lastUpdateId"]
        applied = 0
        frames = [first]
        while last < target:
            frames += client.pending()
            for frame in frames:
                data = frame["data"]
                if data["u"] <= last:
                    continue
                assert data["U"] == last + 1 if applied else data["U"] <= last + 1 <= data["u"]
                book.apply(data["b"], data["a"])
                last, applied = data["u"], applied + 1
            frames = [] if last >= target else [await client.next_data(TIMEOUT)]
        assert book.lists() == sim.true_book("binance", symbol) and applied > 0
        await client.close()
