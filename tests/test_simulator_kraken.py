"""The simulator's Kraken venue over loopback, spoken to by a client written from
PROTOCOLS.md §5.3 (its own checksum and book code, not the daemon's)."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest_twisted

from aggregator.simulator.kraken import KrakenVenue
from tests.simclient import Client, connect, get, running, sleep, until


def crc(asks: list[tuple[str, str]], bids: list[tuple[str, str]]) -> int:
    def strip(text: str) -> str:
        return text.replace(".", "").lstrip("0")
    return zlib.crc32("".join(strip(p) + strip(q) for p, q in asks + bids).encode())


class KrakenBook:
    """A client's book: applies messages, truncates to the depth, checks checksums."""

    def __init__(self, depth: int, price_decimals: int, size_decimals: int) -> None:
        self.depth, self.pd, self.sd = depth, price_decimals, size_decimals
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self.overfull = 0  # updates after which a side held more than `depth` (we truncate)

    def apply(self, data: dict[str, Any], snapshot: bool) -> bool:
        if snapshot:
            self.bids, self.asks = {}, {}
        for side, levels in ((self.bids, data["bids"]), (self.asks, data["asks"])):
            for level in levels:
                if level["qty"] == 0:
                    side.pop(level["price"], None)
                else:
                    side[level["price"]] = level["qty"]
        if len(self.bids) > self.depth or len(self.asks) > self.depth:
            self.overfull += 1
        self.bids = dict(sorted(self.bids.items(), reverse=True)[: self.depth])
        self.asks = dict(sorted(self.asks.items())[: self.depth])
        return self.checksum() == data["checksum"]

    def checksum(self) -> int:
        def text(levels: list[tuple[float, float]]) -> list[tuple[str, str]]:
            return [(f"{p:.{self.pd}f}", f"{q:.{self.sd}f}") for p, q in levels]
        return crc(text(sorted(self.asks.items())[:10]),
                   text(sorted(self.bids.items(), reverse=True)[:10]))

    def top(self) -> tuple[list, list]:
        return sorted(self.bids.items(), reverse=True), sorted(self.asks.items())


async def asset_pairs(sim: Any) -> dict[str, Any]:
    code, _, body = await get(sim.urls["kraken_rest_url"] + "/0/public/AssetPairs")
    assert code == 200
    document = orjson.loads(body)
    assert document["error"] == []
    return document["result"]


async def subscribe(client: Client, symbols: list[str], depth: int = 10, req_id: int = 1) -> list:
    client.send({"method": "subscribe", "params": {"channel": "book", "symbol": symbols, "depth": depth},
                 "req_id": req_id})
    return [await client.next_matching(lambda m: m.get("method") == "subscribe") for _ in symbols]


def books(messages: list) -> list:
    return [m for m in messages if m.get("channel") == "book"]


@pytest_twisted.ensureDeferred
async def test_asset_pairs_use_krakens_own_names():
    async with running(source="synthetic", seed=3) as sim:
        pairs = await asset_pairs(sim)
        assert set(pairs) == {"XXBTZUSD", "XETHXXBT"}
        btc = pairs["XXBTZUSD"]
        assert (btc["wsname"], btc["base"], btc["quote"], btc["status"]) == ("XBT/USD", "XXBT", "ZUSD", "online")
        assert (btc["pair_decimals"], btc["lot_decimals"]) == (2, 8)  # as the market writes them
        code, _, body = await get(sim.urls["kraken_rest_url"] + "/0/public/Depth")
        assert code == 404 and orjson.loads(body)["error"] == ["EGeneral:Unknown method"]


@pytest_twisted.ensureDeferred
async def test_snapshot_and_updates_keep_a_truncating_client_exact_with_every_checksum():
    async with running(source="synthetic", seed=3, speed=4.0) as sim:
        pairs = await asset_pairs(sim)
        client = await connect(sim.urls["kraken_ws_url"])
        status = await client.next()
        assert status["channel"] == "status" and status["data"][0]["system"] == "online"
        (reply,) = await subscribe(client, ["BTC/USD"])
        assert reply["success"] is True and reply["req_id"] == 1
        assert reply["result"]["symbol"] == "BTC/USD" and reply["result"]["depth"] == 10
        entry = pairs["XXBTZUSD"]
        book = KrakenBook(10, entry["pair_decimals"], entry["lot_decimals"])
        snapshot = await client.next_matching(lambda m: m.get("channel") == "book")
        assert snapshot["type"] == "snapshot"
        (data,) = snapshot["data"]
        assert data["symbol"] == "BTC/USD" and len(data["bids"]) == len(data["asks"]) == 10
        assert book.apply(data, snapshot=True)
        updates = 0
        while updates < 60:
            message = await client.next_matching(lambda m: m.get("channel") == "book")
            assert message["type"] == "update"
            assert book.apply(message["data"][0], snapshot=False)
            updates += 1
        # Kraken leaves a level pushed past the depth for the client to drop.
        assert book.overfull > 0
        sim.pause()
        await sleep(0.2)
        for message in books(client.pending()):
            assert book.apply(message["data"][0], snapshot=False)
        bids, asks = sim.true_book("kraken", "btcusd")
        assert book.top() == (bids[:10], asks[:10])
        await client.close()


@pytest_twisted.ensureDeferred
async def test_requests_errors_ping_and_heartbeat():
    async with running(source="synthetic", seed=3) as sim:
        client = await connect(sim.urls["kraken_ws_url"])
        await client.next()  # status
        client.send({"method": "ping", "req_id": 7})
        pong = await client.next_matching(lambda m: m.get("method") == "pong")
        assert pong["req_id"] == 7
        (unknown, ok) = await subscribe(client, ["NO/SUCH", "ETH/BTC"], depth=25, req_id=2)
        assert unknown["success"] is False and unknown["symbol"] == "NO/SUCH" and unknown["req_id"] == 2
        assert ok["success"] is True and ok["result"]["depth"] == 25
        (again,) = await subscribe(client, ["ETH/BTC"], req_id=3)
        assert again["success"] is False and again["error"] == "Already subscribed"
        client.send({"method": "subscribe", "params": {"channel": "book", "symbol": ["ETH/BTC"], "depth": 11},
                     "req_id": 4})
        bad = await client.next_matching(lambda m: m.get("req_id") == 4)
        assert bad["success"] is False
        await client.next_matching(lambda m: m.get("channel") == "heartbeat", timeout=2.0)
        client.send({"method": "unsubscribe", "params": {"channel": "book", "symbol": ["BTC/USD"], "depth": 10},
                     "req_id": 5})
        assert (await client.next_matching(lambda m: m.get("req_id") == 5))["success"] is False
        client.send({"method": "unsubscribe", "params": {"channel": "book", "symbol": ["ETH/BTC"], "depth": 25},
                     "req_id": 6})
        assert (await client.next_matching(lambda m: m.get("req_id") == 6))["success"] is True
        assert sim._venues["kraken"].hub.subscribed_symbols() == []
        await client.close()


async def synced(sim: Any, symbol: str = "BTC/USD") -> tuple[Client, KrakenBook]:
    pairs = await asset_pairs(sim)
    entry = next(e for e in pairs.values() if e["wsname"].replace("XBT", "BTC") == symbol)
    client = await connect(sim.urls["kraken_ws_url"])
    await subscribe(client, [symbol])
    book = KrakenBook(10, entry["pair_decimals"], entry["lot_decimals"])
    snapshot = await client.next_matching(lambda m: m.get("channel") == "book")
    assert book.apply(snapshot["data"][0], snapshot=True)
    return client, book


@pytest_twisted.ensureDeferred
async def test_corrupt_checksum_fault_spoils_one_update_only():
    async with running(source="synthetic", seed=3, speed=4.0) as sim:
        client, book = await synced(sim)
        venue: KrakenVenue = sim._venues["kraken"]
        venue.corrupt_next_checksum("btcusd")
        # Updates made before the fault was armed may still be on their way.
        results = []
        while not results or results[-1]:
            assert len(results) < 5, "no update with a wrong checksum arrived"
            update = await client.next_matching(lambda m: m.get("channel") == "book")
            results.append(book.apply(update["data"][0], snapshot=False))
        # The spoiled one carried the right levels: the book goes on matching.
        for _ in range(5):
            update = await client.next_matching(lambda m: m.get("channel") == "book")
            assert book.apply(update["data"][0], snapshot=False)
        await client.close()


@pytest_twisted.ensureDeferred
async def test_lost_updates_show_in_the_next_checksum():
    async with running(source="synthetic", seed=3, speed=4.0) as sim:
        client, book = await synced(sim)
        frames = sim.frames_sent("kraken", "btcusd")
        sim.skip_updates("kraken", "btcusd", 2)
        await until(lambda: sim.frames_sent("kraken", "btcusd") > frames)
        mismatches = 0
        for _ in range(3):
            update = await client.next_matching(lambda m: m.get("channel") == "book")
            mismatches += not book.apply(update["data"][0], snapshot=False)
        assert mismatches > 0
        await client.close()


@pytest_twisted.ensureDeferred
async def test_stale_snapshot_is_consistent_but_the_updates_after_it_are_not():
    async with running(source="synthetic", seed=3, speed=4.0) as sim:
        await sleep(0.5)  # some history to go back to
        sim.stale_snapshot("kraken", "btcusd", 20)
        client, book = await synced(sim)  # its own checksum is right
        results = []
        for _ in range(5):
            update = await client.next_matching(lambda m: m.get("channel") == "book")
            results.append(book.apply(update["data"][0], snapshot=False))
        assert not all(results)
        await client.close()


@pytest_twisted.ensureDeferred
async def test_bad_frames():
    async with running(source="synthetic", seed=3) as sim:
        client, _ = await synced(sim, "ETH/BTC")
        for kind in ("nan_price", "inf_price", "zero_price", "negative_amount", "wrong_types",
                     "unknown_event", "malformed_json"):
            assert sim.send_bad_frame("kraken", "ethbtc", kind) == 1
            raw = await client.next_raw()
            while b'"heartbeat"' in raw or (b'"checksum":0' not in raw and kind != "malformed_json"):
                raw = await client.next_raw()
            if kind == "malformed_json":
                while True:
                    try:
                        orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        break
                    raw = await client.next_raw()
            else:
                message = orjson.loads(raw)
                level = message["data"][0]["bids"][0]
                expected = {"nan_price": ("price", "NaN"), "inf_price": ("price", "Infinity"),
                            "zero_price": ("price", 0.0)}.get(kind)
                if expected is not None:
                    assert level[expected[0]] == expected[1]
                elif kind == "negative_amount":
                    assert level["qty"] < 0
                elif kind == "wrong_types":
                    assert isinstance(level["price"], list)
                else:
                    assert message["channel"] == "book_v9"
        await client.close()
