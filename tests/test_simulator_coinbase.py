"""Loopback tests of the Coinbase simulator: its websocket (level2, heartbeats,
subscriptions, errors, the per-socket sequence) and REST product list, and its
faults. The client here is written from PROTOCOLS.md §5.2, not with the
daemon's adapter."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted

from aggregator.simulator.coinbase import CoinbaseVenue
from tests.simclient import Client, Reference, _reactor, connect, get, running, sleep


class Session:
    """One socket, checking that its sequence_num counts 0, 1, 2, ..."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.expected = 0

    async def next(self, timeout: float = 3.0) -> Any:
        message = await self.client.next(timeout)
        if "sequence_num" in message:
            assert message["sequence_num"] == self.expected, message
            self.expected += 1
        return message

    async def next_matching(self, predicate: Any, timeout: float = 3.0) -> Any:
        while True:
            message = await self.next(timeout)
            if predicate(message):
                return message

    async def next_on(self, channel: str, timeout: float = 3.0) -> Any:
        return await self.next_matching(lambda m: m.get("channel") == channel, timeout)

    def send(self, message: Any) -> None:
        self.client.send(message)


def subscribe(products: list[str], kind: str = "subscribe") -> dict:
    return {"type": kind, "product_ids": products, "channel": "level2"}


def sides(updates: list[dict]) -> tuple[list, list]:
    bids = [(u["price_level"], u["new_quantity"]) for u in updates if u["side"] == "bid"]
    asks = [(u["price_level"], u["new_quantity"]) for u in updates if u["side"] == "offer"]
    assert len(bids) + len(asks) == len(updates)
    return bids, asks


def venue(sim) -> CoinbaseVenue:
    coinbase = sim._venue("coinbase")
    assert isinstance(coinbase, CoinbaseVenue)
    return coinbase


@pytest_twisted.ensureDeferred
async def test_level2_snapshot_and_updates_reproduce_the_true_book():
    async with running(source="synthetic", seed=3, speed=3.0) as sim:
        assert sim.symbols("coinbase") == ["btcusd", "ethbtc"]
        session = Session(await connect(sim.urls["coinbase_ws_url"]))
        session.send(subscribe(["ETH-BTC"]))
        snapshot = await session.next()
        assert snapshot["channel"] == "l2_data" and snapshot["client_id"] == ""
        (event,) = snapshot["events"]
        assert event["type"] == "snapshot" and event["product_id"] == "ETH-BTC"
        book = Reference(*sides(event["updates"]))
        ack = await session.next()
        assert ack["channel"] == "subscriptions"
        assert ack["events"] == [{"subscriptions": {"level2": ["ETH-BTC"]}}]
        await sleep(0.3)
        sim.pause()
        await sleep(0.1)
        for message in [orjson.loads(raw) for raw in session.client.raw.pending]:
            assert message["sequence_num"] == session.expected
            session.expected += 1
            (event,) = message["events"]
            assert event["type"] == "update" and event["product_id"] == "ETH-BTC"
            bids, asks = sides(event["updates"])
            assert all(q == "0" or float(q) > 0 for _, q in bids + asks)
            book.apply(bids, asks)
        assert session.expected > 2  # updates came
        assert book.lists() == sim.true_book("coinbase", "ethbtc")
        await session.client.close()


@pytest_twisted.ensureDeferred
async def test_subscriptions_heartbeats_and_errors():
    async with running(source="synthetic", speed=1.0) as sim:
        sim.pause()
        session = Session(await connect(sim.urls["coinbase_ws_url"]))
        session.send({"type": "subscribe", "channel": "heartbeats"})
        ack = await session.next()
        assert ack["events"] == [{"subscriptions": {"heartbeats": ["heartbeats"]}}]
        beat = await session.next_on("heartbeats", timeout=2.0)
        assert beat["events"][0]["heartbeat_counter"] == 1
        # Every product of the subscribe must be served; an error names none.
        session.send(subscribe(["ETH-BTC", "DOGE-USD"]))
        assert await session.next_matching(lambda m: "type" in m) == {
            "type": "error", "message": "Failed to subscribe"}
        session.send({"type": "subscribe", "channel": "level2"})
        assert (await session.next_matching(lambda m: "type" in m))["type"] == "error"
        session.client.send(b"{not json")
        assert (await session.next_matching(lambda m: "type" in m))["type"] == "error"
        session.send(subscribe(["BTC-USD", "ETH-BTC"]))
        first = await session.next_on("l2_data")
        second = await session.next_on("l2_data")
        assert [first["events"][0]["product_id"], second["events"][0]["product_id"]] == [
            "BTC-USD", "ETH-BTC"]
        ack = await session.next_on("subscriptions")
        assert ack["events"][0]["subscriptions"] == {
            "level2": ["BTC-USD", "ETH-BTC"], "heartbeats": ["heartbeats"]}
        # Subscribing again sends no new snapshot; unsubscribing and subscribing does.
        session.send(subscribe(["ETH-BTC"]))
        assert (await session.next_on("subscriptions"))["events"][0]["subscriptions"]["level2"] == [
            "BTC-USD", "ETH-BTC"]
        session.send(subscribe(["ETH-BTC"], "unsubscribe"))
        assert (await session.next_on("subscriptions"))["events"][0]["subscriptions"]["level2"] == [
            "BTC-USD"]
        session.send(subscribe(["ETH-BTC"]))
        again = await session.next()
        while again.get("channel") == "heartbeats":
            again = await session.next()
        assert again["events"][0]["type"] == "snapshot"
        await session.client.close()


@pytest_twisted.ensureDeferred
async def test_a_socket_that_subscribes_nothing_is_closed_after_5s():
    async with running(source="synthetic") as sim:
        client = await connect(sim.urls["coinbase_ws_url"])
        await client.closed.addTimeout(7.0, _reactor())
        assert client.close_code == 1008
        assert [v.kind for v in sim.violations] == ["no_subscribe"]


@pytest_twisted.ensureDeferred
async def test_products_rest_and_other_paths():
    async with running(source="synthetic") as sim:
        code, headers, body = await get(
            f"{sim.urls['coinbase_rest_url']}/api/v3/brokerage/market/products?product_type=SPOT")
        assert code == 200
        document = orjson.loads(body)
        assert document["num_products"] == 2
        assert [(p["product_id"], p["base_currency_id"], p["quote_currency_id"], p["status"],
                 p["trading_disabled"], p["product_type"]) for p in document["products"]] == [
            ("BTC-USD", "BTC", "USD", "online", False, "SPOT"),
            ("ETH-BTC", "ETH", "BTC", "online", False, "SPOT")]
        code, _, _ = await get(f"{sim.urls['coinbase_rest_url']}/api/v3/brokerage/products/BTC-USD/book")
        assert code == 404
        assert [r.path for r in sim.rest_log("coinbase")] == [
            "/api/v3/brokerage/market/products", "/api/v3/brokerage/products/BTC-USD/book"]


@pytest.mark.parametrize("fault", ["skip_updates", "lose_next_update"])
@pytest_twisted.ensureDeferred
async def test_lost_or_skipped_updates_show_as_a_sequence_gap(fault):
    async with running(source="synthetic", speed=3.0) as sim:
        client = await connect(sim.urls["coinbase_ws_url"])
        client.send(subscribe(["ETH-BTC"]))
        await client.next_matching(lambda m: m.get("channel") == "subscriptions")
        sim.pause()
        await sleep(0.2)  # whatever was in flight has arrived
        last = max([m["sequence_num"] for m in client.pending()], default=1)
        if fault == "skip_updates":
            sim.skip_updates("coinbase", "ethbtc", 3)
        else:
            sim.lose_next_update("coinbase", "ethbtc")
        sim.resume()
        after = await client.next()
        assert after["sequence_num"] == last + (4 if fault == "skip_updates" else 2)
        following = await client.next()
        assert following["sequence_num"] == after["sequence_num"] + 1
        await client.close()


@pytest.mark.parametrize("kind", ["malformed_json", "nan_price", "inf_price", "zero_price",
                                  "negative_amount", "wrong_types", "unknown_event"])
@pytest_twisted.ensureDeferred
async def test_bad_frames_use_up_a_sequence_number(kind):
    async with running(source="synthetic", speed=1.0) as sim:
        sim.pause()
        client = await connect(sim.urls["coinbase_ws_url"])
        client.send(subscribe(["ETH-BTC"]))
        await client.next()  # snapshot 0
        await client.next()  # ack 1
        assert sim.send_bad_frame("coinbase", "ethbtc", kind) == 1
        raw = await client.next_raw()
        if kind == "malformed_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(raw)
        else:
            message = orjson.loads(raw)
            assert message["sequence_num"] == ([2] if kind == "wrong_types" else 2)
            update = message["events"][0]["updates"][0]
            expected = {"nan_price": ("price_level", "NaN"), "inf_price": ("price_level", "Infinity"),
                        "zero_price": ("price_level", "0")}.get(kind)
            if expected:
                assert update[expected[0]] == expected[1]
            if kind == "negative_amount":
                assert update["new_quantity"].startswith("-")
            if kind == "unknown_event":
                assert message["channel"] == "l2_data_v9"
        client.send({"type": "subscribe", "channel": "heartbeats"})
        ack = await client.next_matching(lambda m: m.get("channel") == "subscriptions")
        assert ack["sequence_num"] == 3
        assert sim.send_bad_frame("coinbase", "btcusd", kind) == 0  # nobody carries it
        await client.close()


@pytest_twisted.ensureDeferred
async def test_silenced_heartbeats_stop_while_data_goes_on_and_new_sockets_get_theirs():
    async with running(source="synthetic", speed=3.0) as sim:
        old = Session(await connect(sim.urls["coinbase_ws_url"]))
        old.send({"type": "subscribe", "channel": "heartbeats"})
        old.send(subscribe(["ETH-BTC"]))
        await old.next_on("heartbeats", timeout=2.0)
        assert venue(sim).silence_heartbeats() == 1
        old.client.pending()
        await sleep(1.5)
        channels = {m["channel"] for m in old.client.pending()}
        assert "l2_data" in channels and "heartbeats" not in channels
        new = Session(await connect(sim.urls["coinbase_ws_url"]))
        new.send({"type": "subscribe", "channel": "heartbeats"})
        await new.next_on("heartbeats", timeout=2.0)
        await old.client.close()
        await new.client.close()


@pytest_twisted.ensureDeferred
async def test_silent_close_sends_no_close_frame():
    async with running(source="synthetic") as sim:
        client = await connect(sim.urls["coinbase_ws_url"])
        client.send({"type": "subscribe", "channel": "heartbeats"})
        await client.next()
        assert venue(sim).close_silently() == 1
        await client.closed.addTimeout(3.0, _reactor())
        assert client.close_code is None or client.close_code == 1006  # no close frame came


def test_venue_listing_and_formats():
    assert CoinbaseVenue.synthetic_symbols == frozenset({"btcusd", "ethbtc"})
    assert CoinbaseVenue.decimals("btcusd", 2) == (2, 8)
