"""Loopback tests: the simulator's websocket and REST servers, spoken to over real sockets.

Clients here are written from PROTOCOLS.md only (Autobahn client + treq), never with the
daemon's feed code. Every test is bounded (timeouts of a few seconds) and leaves no timers
or connections behind.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.web.client import HTTPConnectionPool

from aggregator.simulator import SimulatorService
from tests.simclient import TIMEOUT, Client, Reference, _reactor, connect, get, running, sleep



async def binance_sync(sim: SimulatorService, client: Client, symbol: str) -> Reference:
    """PROTOCOLS §1.7 against the simulator: buffer, snapshot, drop u <= L, check U == last+1,
    until the simulator is paused and everything it applied has been received; returns the book."""
    first = await client.next_matching(lambda m: "stream" in m)
    _, _, body = await get(f"{sim.urls['binance_rest_url']}/api/v3/depth?symbol={symbol.upper()}&limit=5000")
    snap = orjson.loads(body)
    last = snap["lastUpdateId"]
    assert last >= first["data"]["U"] - 1
    book = Reference(snap["bids"], snap["asks"])
    buffered = [first] + client.pending()
    applied = 0
    await sleep(0.3)
    sim.pause()
    target = sim.market("binance", symbol).last_update_id

    def frames() -> Any:
        yield from buffered
        buffered.clear()

    while last < target:
        for frame in list(frames()) + client.pending():
            data = frame["data"]
            assert frame["stream"] == f"{symbol}@depth@100ms" and data["s"] == symbol.upper()
            if data["u"] <= last:
                continue
            assert data["U"] == last + 1 if applied else data["U"] <= last + 1 <= data["u"]
            book.apply(data["b"], data["a"])
            last = data["u"]
            applied += 1
        if last < target:
            buffered.append(await client.next_matching(lambda m: "stream" in m))
    assert last == target and applied > 0
    return book


@pytest_twisted.ensureDeferred
async def test_binance_subscribe_frames_and_sync_reproduce_true_book():
    async with running(source="synthetic", seed=4, speed=3.0) as sim:
        client = await connect(sim.urls["binance_ws_url"] + "/stream")
        client.send({"method": "SUBSCRIBE", "params": ["btcusdt@depth@100ms"], "id": 1})
        assert await client.next() == {"result": None, "id": 1}
        book = await binance_sync(sim, client, "btcusdt")
        assert book.lists() == sim.true_book("binance", "btcusdt")
        # Frames carry the Binance shape, 8-decimal strings, bids desc / asks asc.
        sim.resume()
        frame = await client.next()
        data = frame["data"]
        assert list(data) == ["e", "E", "s", "U", "u", "b", "a"] and data["e"] == "depthUpdate"
        for side, reverse in ((data["b"], True), (data["a"], False)):
            prices = [float(p) for p, _ in side]
            assert prices == sorted(prices, reverse=reverse)
            assert all(len(p.split(".")[1]) == 8 and len(a.split(".")[1]) == 8 for p, a in side)
        await client.close()


@pytest_twisted.ensureDeferred
async def test_binance_recorded_replay_over_the_wire():
    async with running(source="recorded", speed=20.0, loop=True) as sim:
        client = await connect(sim.urls["binance_ws_url"] + "/stream?streams=nknusdt@depth@100ms")
        book = await binance_sync(sim, client, "nknusdt")
        assert book.lists() == sim.true_book("binance", "nknusdt")
        await client.close()


@pytest_twisted.ensureDeferred
async def test_binance_control_messages_and_errors():
    # Many requests in a burst: Binance's 5 messages/s limit is off for this test.
    async with running(source="synthetic", speed=2.0, max_messages_per_second=None) as sim:
        client = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethbtc@depth")
        client.send({"method": "LIST_SUBSCRIPTIONS", "id": 1})
        assert await client.next_matching(lambda m: "id" in m) == {"result": ["ethbtc@depth"], "id": 1}
        client.send({"method": "SUBSCRIBE", "params": ["ltcbtc@depth@100ms", "foobar@depth"], "id": 2})
        assert await client.next_matching(lambda m: "id" in m) == {"result": None, "id": 2}
        client.send({"method": "UNSUBSCRIBE", "params": ["ethbtc@depth"], "id": 3})
        assert await client.next_matching(lambda m: "id" in m) == {"result": None, "id": 3}
        client.send({"method": "LIST_SUBSCRIPTIONS", "id": 4})
        reply = await client.next_matching(lambda m: "id" in m)
        assert reply == {"result": ["ltcbtc@depth@100ms", "foobar@depth"], "id": 4}
        client.send(b"{not json")
        reply = await client.next_matching(lambda m: "error" in m)
        assert reply["error"]["code"] == 3 and reply["error"]["msg"].startswith("Invalid JSON")
        for bad_id, request in enumerate(
            (
                {"method": "SUBSCRIBE", "params": ["BTCUSDT@depth"]},
                {"method": "SUBSCRIBE", "params": "btcusdt@depth"},
                {"method": "SUBSCRIBE", "params": ["btcusdt@bookTicker"]},
                {"method": "NOPE", "params": []},
            ),
            start=10,
        ):
            client.send({**request, "id": bad_id})
            reply = await client.next_matching(lambda m: "id" in m)
            assert reply["id"] == bad_id and reply["error"]["code"] == 2, request
        client.send({"method": "SUBSCRIBE", "params": ["BTCUSDT@depth"], "id": 20})
        assert (await client.next_matching(lambda m: "id" in m))["error"] == {
            "code": 2,
            "msg": "Invalid request: invalid stream",
        }
        # Data only for the served symbol; the unknown one stays silent.
        await sleep(0.35)
        streams = {m.get("stream") for m in client.pending()}
        assert "ltcbtc@depth@100ms" in streams and "foobar@depth" not in streams
        await client.close()


@pytest_twisted.ensureDeferred
async def test_binance_other_paths_are_refused():
    async with running(source="recorded") as sim:
        with pytest.raises(Exception):
            await connect(sim.urls["binance_ws_url"] + "/ws/nknusdt@depth")
        with pytest.raises(Exception):
            await connect(sim.urls["binance_ws_url"] + "/stream?streams=NKNUSDT@depth")


@pytest_twisted.ensureDeferred
async def test_binance_rest():
    async with running(source="both", speed=1.0) as sim:
        base = sim.urls["binance_rest_url"]
        code, headers, body = await get(base + "/api/v3/exchangeInfo")
        info = orjson.loads(body)
        assert code == 200 and headers.getRawHeaders("content-type")[0].startswith("application/json")
        assert {"timezone", "serverTime", "rateLimits", "exchangeFilters", "symbols"} <= set(info)
        assert any(r["rateLimitType"] == "REQUEST_WEIGHT" for r in info["rateLimits"])
        trading = sorted(s["symbol"].lower() for s in info["symbols"] if s["status"] == "TRADING")
        assert trading == sim.symbols("binance")
        assert [s["status"] for s in info["symbols"]].count("BREAK") == 1
        nkn = next(s for s in info["symbols"] if s["symbol"] == "NKNUSDT")
        assert (nkn["baseAsset"], nkn["quoteAsset"]) == ("NKN", "USDT")
        assert any(f["filterType"] == "PRICE_FILTER" for f in nkn["filters"])

        code, headers, body = await get(base + "/api/v3/depth?symbol=ETHBTC&limit=5")
        depth = orjson.loads(body)
        assert code == 200 and list(depth) == ["lastUpdateId", "bids", "asks"]
        assert len(depth["bids"]) == len(depth["asks"]) == 5
        assert headers.getRawHeaders("x-mbx-used-weight-1m")
        code, _, body = await get(base + "/api/v3/depth?symbol=NKNUSDT")
        assert code == 200 and len(orjson.loads(body)["asks"]) == 100  # default limit
        code, _, body = await get(base + "/api/v3/depth?symbol=NKNUSDT&limit=5000")
        assert len(orjson.loads(body)["asks"]) == 1000  # the whole recorded book

        for query, err in (
            ("symbol=FOOBAR", -1121),
            ("symbol=ethbtc", -1100),
            ("", -1102),
            ("symbol=ETHBTC&limit=x", -1100),
        ):
            code, headers, body = await get(base + "/api/v3/depth?" + query)
            assert code == 400 and orjson.loads(body)["code"] == err, query
        code, _, body = await get(base + "/api/v3/depth?symbol=FOOBAR")
        assert orjson.loads(body) == {"code": -1121, "msg": "Invalid symbol."}
        code, _, _ = await get(base + "/api/v3/nothing")
        assert code == 404
        code, _, body = await get(base + '/api/v3/exchangeInfo?symbols=["LRCBTC","ETHBTC"]')
        assert [s["symbol"] for s in orjson.loads(body)["symbols"]] == ["LRCBTC", "ETHBTC"]
        code, _, body = await get(base + "/api/v3/exchangeInfo?symbol=FOOBAR")
        assert code == 400 and orjson.loads(body)["code"] == -1121


# ------------------------------------------------------------------ Bitstamp


async def subscribe(client: Client, channel: str, event: str = "bts:subscribe") -> dict:
    client.send({"event": event, "data": {"channel": channel}})
    return await client.next_matching(lambda m: m.get("event") != "data")


@pytest_twisted.ensureDeferred
async def test_bitstamp_channels_and_sync_reproduce_true_book():
    async with running(source="synthetic", seed=8, speed=3.0) as sim:
        client = await connect(sim.urls["bitstamp_ws_url"])
        for channel in ("diff_order_book_ethbtc", "order_book_ethbtc"):
            assert await subscribe(client, channel) == {
                "event": "bts:subscription_succeeded",
                "channel": channel,
                "data": {},
            }
        first = await client.next_matching(lambda m: m["channel"] == "diff_order_book_ethbtc")
        code, _, body = await get(f"{sim.urls['bitstamp_rest_url']}/api/v2/order_book/ethbtc/?_=1")
        snap = orjson.loads(body)
        assert code == 200 and int(snap["timestamp"]) == int(snap["microtimestamp"]) // 10**6
        s = int(snap["microtimestamp"])
        book = Reference(snap["bids"], snap["asks"])
        await sleep(0.3)
        sim.pause()
        final = sim.market("bitstamp", "ethbtc").last_microtimestamp
        frames = [first] + client.pending()
        while int(frames[-1]["data"]["microtimestamp"]) < final or frames[-1]["channel"] != "order_book_ethbtc":
            frames.append(await client.next())
        last_us: dict[str, int] = {}
        last_full = None
        for frame in frames:
            channel, data = frame["channel"], frame["data"]
            assert frame["event"] == "data" and list(data) == ["timestamp", "microtimestamp", "bids", "asks"]
            us = int(data["microtimestamp"])
            assert us > last_us.get(channel, 0) and int(data["timestamp"]) == us // 10**6
            last_us[channel] = us
            if channel == "diff_order_book_ethbtc":
                if us > s:
                    book.apply(data["bids"], data["asks"])
            else:
                last_full = data
        bids, asks = sim.true_book("bitstamp", "ethbtc")
        assert book.lists() == (bids, asks)
        # order_book_: the full top 100 of the same book, bids desc and asks asc.
        assert last_full is not None and int(last_full["microtimestamp"]) == final
        assert Reference(last_full["bids"], last_full["asks"]).lists() == (bids[:100], asks[:100])
        # Bitstamp decimals for ETH/BTC: 8 and 8.
        price, amount = last_full["bids"][0]
        assert len(price.split(".")[1]) == 8 and len(amount.split(".")[1]) == 8
        await client.close()


@pytest_twisted.ensureDeferred
async def test_bitstamp_control_messages_and_errors():
    async with running(source="recorded", speed=5.0) as sim:
        client = await connect(sim.urls["bitstamp_ws_url"] + "/")
        client.send({"event": "bts:heartbeat"})
        assert await client.next() == {"event": "bts:heartbeat", "channel": "", "data": {"status": "success"}}
        client.send(b"{oops")
        assert await client.next() == {
            "event": "bts:error",
            "channel": "",
            "data": {"code": None, "message": "Incorrect JSON format."},
        }
        reply = await subscribe(client, "order_book_ETH/USD")
        assert reply["event"] == "bts:error" and reply["data"]["message"] == "Invalid channel provided."
        client.send({"event": "bts:subscribe", "data": {}})
        assert (await client.next())["data"]["message"] == "Bad subscription string."
        # A well-formed unknown pair is acknowledged, then silent.
        reply = await subscribe(client, "diff_order_book_foobar")
        assert reply["event"] == "bts:subscription_succeeded"
        assert (await subscribe(client, "diff_order_book_usdtusd"))["event"] == "bts:subscription_succeeded"
        frame = await client.next()
        assert frame["channel"] == "diff_order_book_usdtusd" and frame["event"] == "data"
        # usdtusd writes amounts with base_decimals 5, including zero deletes.
        assert all(len(a.split(".")[1]) == 5 for _, a in frame["data"]["bids"] + frame["data"]["asks"])
        reply = await subscribe(client, "diff_order_book_usdtusd", "bts:unsubscribe")
        assert reply == {"event": "bts:unsubscription_succeeded", "channel": "diff_order_book_usdtusd", "data": {}}
        # The reply was sent after the last usdtusd frame; foobar never sent anything.
        await sleep(0.3)
        assert [m for m in client.pending() if m.get("event") == "data"] == []
        await client.close()


@pytest_twisted.ensureDeferred
async def test_bitstamp_rest():
    async with running(source="both") as sim:
        base = sim.urls["bitstamp_rest_url"]
        code, headers, body = await get(base + "/api/v2/trading-pairs-info/")
        pairs = orjson.loads(body)
        assert code == 200 and headers.getRawHeaders("content-type") == ["application/json"]
        assert sorted(p["url_symbol"] for p in pairs) == sim.symbols("bitstamp")
        eth = next(p for p in pairs if p["url_symbol"] == "ethbtc")
        assert eth["name"] == "ETH/BTC" and eth["trading"] == "Enabled"
        assert {"base_decimals", "counter_decimals"} <= set(eth)
        for path in ("/api/v2/order_book/ethusd", "/api/v2/order_book/ethusd/", "/api/v2/order_book/ethusd/?_=123"):
            code, _, body = await get(base + path)
            snap = orjson.loads(body)
            assert code == 200 and list(snap) == ["timestamp", "microtimestamp", "bids", "asks"], path
        assert len(snap["bids"]) >= 2023 - 100  # the full book, not a top 100
        assert body.startswith(b'{"timestamp": "')  # Bitstamp REST style: spaces after separators
        code, headers, body = await get(base + "/api/v2/order_book/foobar/")
        assert code == 404 and b"<html" in body.lower()
        assert headers.getRawHeaders("content-type")[0].startswith("text/html")


# ------------------------------------------------------------------ service lifecycle


@pytest_twisted.ensureDeferred
async def test_stop_drops_clients_and_restart_reuses_urls():
    reactor = _reactor()
    sim = SimulatorService(reactor=reactor, source="synthetic")
    sim.startService()
    urls = dict(sim.urls)
    binance = await connect(urls["binance_ws_url"] + "/stream?streams=ethbtc@depth@100ms")
    bitstamp = await connect(urls["bitstamp_ws_url"])
    # A keep-alive REST connection, as treq's default pool makes.
    pool = HTTPConnectionPool(reactor, persistent=True)
    response = await treq.get(urls["bitstamp_rest_url"] + "/api/v2/trading-pairs-info/", pool=pool)
    await response.content()
    assert sim.connection_count == 3
    await sim.stopService()
    await binance.closed.addTimeout(TIMEOUT, reactor)
    await bitstamp.closed.addTimeout(TIMEOUT, reactor)
    assert sim.connection_count == 0
    await pool.closeCachedConnections()
    with pytest.raises(Exception):
        await connect(urls["binance_ws_url"] + "/stream")
    # Started again: same URLs, data flows again.
    sim.startService()
    try:
        assert sim.urls == urls
        client = await connect(urls["binance_ws_url"] + "/stream?streams=ethbtc@depth@100ms")
        frame = await client.next()
        assert frame["stream"] == "ethbtc@depth@100ms"
        # drop_clients: connections go, the listener stays.
        await sim.drop_clients()
        await client.closed.addTimeout(TIMEOUT, reactor)
        client = await connect(urls["bitstamp_ws_url"])
        await client.close()
    finally:
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_no_loop_goes_quiet_and_finishes():
    async with running(source="synthetic", speed=100.0, loop=False) as sim:
        client = await connect(sim.urls["binance_ws_url"] + "/stream?streams=btceur@depth@100ms")
        for _ in range(200):
            if sim.finished:
                break
            await sleep(0.05)
        assert sim.finished
        await sleep(0.25)  # the last flush
        client.pending()
        before = sim.true_book("binance", "btceur")
        await sleep(0.3)
        assert client.pending() == [] and sim.true_book("binance", "btceur") == before
        await client.close()


# ------------------------------------------------------------------ faults


@pytest_twisted.ensureDeferred
async def test_fault_lost_binance_frame_shows_as_a_gap():
    async with running(source="synthetic", speed=3.0) as sim:
        client = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethusdt@depth@100ms")
        first = (await client.next())["data"]
        sim.lose_next_update("binance", "ethusdt")
        second = (await client.next())["data"]
        assert second["U"] > first["u"] + 1  # the lost frame's ids are missing
        third = (await client.next())["data"]
        assert third["U"] == second["u"] + 1  # and only that one frame
        with pytest.raises(KeyError):
            sim.lose_next_update("binance", "foobar")
        await client.close()


@pytest_twisted.ensureDeferred
async def test_fault_bitstamp_request_reconnect():
    async with running(source="recorded") as sim:
        client = await connect(sim.urls["bitstamp_ws_url"])
        sim.request_reconnect()
        assert await client.next() == {"event": "bts:request_reconnect", "channel": "", "data": ""}
        await client.close()
