"""Loopback tests of the Bybit simulator (aggregator/simulator/bybit.py): its websocket and
REST servers spoken to over real sockets with a client written from PROTOCOLS.md §5.1, and
its venue faults."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted

from tests.simclient import Client, Reference, connect, get, running, sleep

TOPIC = "orderbook.50.BTCUSDT"


def ws_url(sim: Any) -> str:
    return sim.urls["bybit_ws_url"] + "/v5/public/spot"


async def request(client: Client, op: str, args: Any, req_id: str = "1") -> Any:
    client.send({"req_id": req_id, "op": op, "args": args})
    return await client.next_matching(lambda m: m.get("op") == op)


def is_book(m: Any) -> bool:
    return "topic" in m


async def synced(sim: Any, client: Client, topic: str = TOPIC) -> tuple[Reference, int]:
    """Subscribe, apply snapshot + deltas (checking u continuity) until the market is paused
    and every frame is in; returns the book and the last u."""
    reply = await request(client, "subscribe", [topic])
    assert reply["success"] is True and reply["req_id"] == "1" and reply["ret_msg"] == ""
    snapshot = await client.next_matching(is_book)
    assert snapshot["type"] == "snapshot" and snapshot["topic"] == topic
    book = Reference(snapshot["data"]["b"], snapshot["data"]["a"])
    last = snapshot["data"]["u"]
    await sleep(0.3)
    sim.pause()
    await sleep(0.2)
    deltas = 0
    for message in client.pending():
        assert message["type"] == "delta" and message["data"]["u"] == last + 1, message
        book.apply(message["data"]["b"], message["data"]["a"])
        last = message["data"]["u"]
        deltas += 1
    assert deltas > 0
    return book, last


def true_top(sim: Any, symbol: str, depth: int) -> tuple[list, list]:
    bids, asks = sim.market("bybit", symbol).book.floats(depth)
    return bids, asks


@pytest_twisted.ensureDeferred
async def test_snapshot_and_deltas_reproduce_the_true_top_50():
    async with running(source="synthetic", seed=3, speed=3.0) as sim:
        assert sim.symbols("bybit") == ["btcusdt", "ethbtc", "ethusdt"]
        client = await connect(ws_url(sim))
        book, _ = await synced(sim, client)
        bids, asks = book.lists()
        assert (bids, asks) == true_top(sim, "btcusdt", 50)
        assert len(bids) == 50 and len(asks) == 50  # levels leaving the window were deleted
        await client.close()


@pytest_twisted.ensureDeferred
async def test_control_messages_and_errors():
    async with running(source="synthetic", seed=3) as sim:
        client = await connect(ws_url(sim))
        client.send({"req_id": "p", "op": "ping"})
        pong = await client.next()
        assert pong["success"] is True and pong["ret_msg"] == "pong" and pong["op"] == "ping"
        assert pong["req_id"] == "p" and "conn_id" in pong
        too_many = [f"orderbook.50.SYM{i}USDT" for i in range(11)]
        reply = await request(client, "subscribe", too_many)
        assert reply["success"] is False
        assert [v.kind for v in sim.violations] == ["too_many_args"]
        reply = await request(client, "subscribe", ["orderbook.50.FOOBAR"])
        assert reply["success"] is False and "orderbook.50.FOOBAR" in reply["ret_msg"]
        reply = await request(client, "subscribe", ["orderbook.7.BTCUSDT"])
        assert reply["success"] is False
        assert (await request(client, "subscribe", ["orderbook.1.ETHBTC"]))["success"] is True
        level1 = await client.next_matching(is_book)
        assert level1["type"] == "snapshot" and len(level1["data"]["b"]) == 1
        reply = await request(client, "subscribe", ["orderbook.1.ETHBTC"])
        assert reply["success"] is False and "already subscribed" in reply["ret_msg"]
        reply = await request(client, "unsubscribe", ["orderbook.1.ETHBTC"])
        assert reply["success"] is True
        await sleep(0.3)
        assert [m for m in client.pending() if is_book(m)] == []  # nothing after the reply
        client.send(b"{oops")
        assert (await client.next())["success"] is False
        await client.close()


@pytest_twisted.ensureDeferred
async def test_only_the_spot_path_accepts_websockets():
    async with running(source="synthetic", seed=3) as sim:
        with pytest.raises(Exception):
            await connect(sim.urls["bybit_ws_url"] + "/v5/public/linear")


@pytest_twisted.ensureDeferred
async def test_rest_instruments_and_orderbook():
    async with running(source="synthetic", seed=3) as sim:
        base = sim.urls["bybit_rest_url"]
        code, _, body = await get(base + "/v5/market/instruments-info?category=spot")
        document = orjson.loads(body)
        assert code == 200 and document["retCode"] == 0
        entries = document["result"]["list"]
        assert [(e["symbol"], e["baseCoin"], e["quoteCoin"], e["status"]) for e in entries] == [
            ("BTCUSDT", "BTC", "USDT", "Trading"), ("ETHBTC", "ETH", "BTC", "Trading"),
            ("ETHUSDT", "ETH", "USDT", "Trading")]
        _, _, body = await get(base + "/v5/market/instruments-info?category=linear")
        assert orjson.loads(body)["retCode"] != 0
        sim.pause()
        _, _, body = await get(base + "/v5/market/orderbook?category=spot&symbol=ETHBTC&limit=5")
        result = orjson.loads(body)["result"]
        bids, asks = sim.market("bybit", "ethbtc").book.levels(5)
        assert result["s"] == "ETHBTC" and result["b"] == [list(b) for b in bids]
        assert result["a"] == [list(a) for a in asks]


@pytest_twisted.ensureDeferred
async def test_faults_gap_lost_delta_snapshot_restart_and_bad_frame():
    async with running(source="synthetic", seed=3, speed=3.0) as sim:
        venue = sim._venue("bybit")
        client = await connect(ws_url(sim))
        book, last = await synced(sim, client)
        # skip_updates: the next delta's u jumps by the count.
        assert sim.skip_updates("bybit", "btcusdt", 3) == (last + 1, last + 3)
        sim.resume()
        delta = await client.next_matching(is_book)
        assert delta["type"] == "delta" and delta["data"]["u"] > last + 3
        last = delta["data"]["u"]
        # lose_next_update: the next delta is not sent, its u is missing.
        sim.lose_next_update("bybit", "btcusdt")
        delta = await client.next_matching(is_book)
        assert delta["data"]["u"] == last + 2
        last = delta["data"]["u"]
        sim.pause()
        await sleep(0.2)
        last = max([last] + [m["data"]["u"] for m in client.pending() if is_book(m)])
        # A snapshot mid-stream: the true window, the next u.
        assert venue.send_snapshot("btcusdt") == 1
        snapshot = await client.next_matching(is_book)
        assert snapshot["type"] == "snapshot" and snapshot["data"]["u"] == last + 1
        assert Reference(snapshot["data"]["b"], snapshot["data"]["a"]).lists() == true_top(
            sim, "btcusdt", 50)
        # A service restart: snapshot with u = 1, then counting on from there.
        assert venue.restart() == 1
        restart = await client.next_matching(is_book)
        assert restart["type"] == "snapshot" and restart["data"]["u"] == 1
        # A corrupt frame uses up an id; an unknown one does not.
        assert sim.send_bad_frame("bybit", "btcusdt", "nan_price") == 1
        bad = await client.next_matching(is_book)
        assert bad["data"]["u"] == 2 and bad["data"]["b"][0][0] == "NaN"
        sim.send_bad_frame("bybit", "btcusdt", "unknown_event")
        assert (await client.next_matching(is_book))["type"] == "snapshot_v9"
        sim.send_bad_frame("bybit", "btcusdt", "malformed_json")
        assert (await client.next_raw()).startswith(b'{"topic":"orderbook.50.BTCUSDT"')
        sim.resume()
        delta = await client.next_matching(is_book)
        assert delta["type"] == "delta" and delta["data"]["u"] == 4
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_later_subscriber_joins_the_topics_sequence():
    async with running(source="synthetic", seed=3, speed=3.0) as sim:
        first = await connect(ws_url(sim))
        await request(first, "subscribe", [TOPIC])
        await first.next_matching(is_book)
        await sleep(0.2)
        second = await connect(ws_url(sim))
        await request(second, "subscribe", [TOPIC])
        snapshot = await second.next_matching(is_book)
        sim.pause()
        await sleep(0.2)
        seen = [m["data"]["u"] for m in first.pending() if is_book(m)]
        # Both hear the same topic: the newcomer's snapshot is at a u the first one saw.
        assert snapshot["data"]["u"] in seen
        following = [m["data"]["u"] for m in second.pending() if is_book(m)]
        assert following == [u for u in seen if u > snapshot["data"]["u"]]
        await first.close()
        await second.close()
