"""Connection life without sockets: liveness, backoff, rotation, make-before-break
handover, several connections. Time is a Clock; the connector is a fake, and
connections are opened by hand."""

import dataclasses

import orjson
from prometheus_client import REGISTRY

from aggregator.book import BookState, ExchangeBook
from aggregator.exchanges.binance import BinanceAdapter
from aggregator.exchanges.bitstamp import BitstampAdapter
from aggregator.exchanges.feed import VenueFeed
from tests.fakes import FakeConnector, FakeHttp, FakeProtocol, load_listing
from twisted.internet.task import Clock

REST = "http://rest.test"


def ignore(book, arrival):
    pass


def make_feed(adapter, symbols=("ethbtc",), **settings):
    clock = Clock()
    http = FakeHttp()
    connector = FakeConnector()
    feed = VenueFeed(adapter, "ws://ws.test", REST, reactor=clock, http=http,
                     retry_policy=lambda n: float(n), connector=connector)
    if settings:
        feed.settings = dataclasses.replace(feed.settings, **settings)
    feed.startService()
    load_listing(feed, http, [*symbols, *(f"s{i}" for i in range(5))])
    books = {}
    for symbol in symbols:
        books[symbol] = ExchangeBook(feed.name, symbol, ignore)
        feed.watch(books[symbol])
    clock.advance(0)
    feed.connector = connector
    return feed, clock, http, books


def open_connection(connection, clock=None):
    protocol = FakeProtocol()
    connection.connection_opened(protocol)
    if clock is not None:
        clock.advance(0)  # frames leave at the end of the turn
    return protocol


def pass_time(clock, connection, seconds, step=5.0):
    """Let time pass on a healthy connection (the exchange pings now and then)."""
    for _ in range(int(seconds / step)):
        clock.advance(step)
        connection.activity()


def diff(symbol, first, last, bids=()):
    return orjson.dumps({"stream": f"{symbol}@depth@100ms", "data": {
        "e": "depthUpdate", "U": first, "u": last, "b": [list(b) for b in bids], "a": []}})


def ack(connection, protocol):
    for frame in protocol.frames():
        if "id" in frame:
            connection.message_received(orjson.dumps({"result": None, "id": frame["id"]}))


def live_binance(feed, clock, http, connection, protocol, last_update_id=100):
    ack(connection, protocol)
    http.answer(f"{REST}/api/v3/depth", {"lastUpdateId": last_update_id, "bids": [["1", "1"]], "asks": [["2", "1"]]})


def test_silent_connection_is_dropped_after_the_inactivity_timeout():
    feed, clock, _, _ = make_feed(BinanceAdapter)
    protocol = open_connection(feed.connections[0], clock)
    clock.advance(feed.settings.inactivity_timeout - 1)
    assert not protocol.dropped
    clock.advance(feed.settings.inactivity_timeout / 2)
    assert protocol.dropped


def test_pings_keep_a_quiet_connection_alive():
    feed, clock, _, _ = make_feed(BinanceAdapter)
    connection = feed.connections[0]
    protocol = open_connection(connection, clock)
    for _ in range(20):
        clock.advance(20)
        connection.activity()  # the server's ping every 20 s
    assert not protocol.dropped


def test_bitstamp_sends_a_heartbeat_when_idle():
    feed, clock, _, _ = make_feed(BitstampAdapter)
    protocol = open_connection(feed.connections[0], clock)
    clock.advance(feed.settings.inactivity_timeout * 0.75 + 0.1)
    clock.advance(0.1)  # frames are paced
    assert {"event": "bts:heartbeat"} in protocol.frames()
    assert not protocol.dropped


def test_flapping_connections_keep_the_backoff_growing():
    feed, clock, _, _ = make_feed(BinanceAdapter)
    connection = feed.connections[0]
    for flaps in range(1, 4):
        protocol = open_connection(connection, clock)
        clock.advance(1)
        connection.connection_closed(protocol, "code=1006")
        assert connection.retry_delay(0) == float(flaps)
    protocol = open_connection(connection, clock)
    clock.advance(feed.settings.healthy_period + 1)
    connection.connection_closed(protocol, "code=1006")
    assert connection.retry_delay(0) == 0.0  # a healthy period resets it


def test_binance_connection_is_rotated_before_the_24h_limit():
    feed, clock, _, _ = make_feed(BinanceAdapter)
    open_connection(feed.connections[0], clock)
    feed.connector.started.clear()
    clock.advance(23.5 * 3600)
    assert len(feed.connector.started) == 1
    assert feed.pool.predecessor(feed.connector.started[0]) is feed.connections[0]


def test_make_before_break_handover_keeps_the_book_live_without_a_resync():
    feed, clock, http, books = make_feed(BinanceAdapter)
    old = feed.connections[0]
    old_protocol = open_connection(old, clock)
    live_binance(feed, clock, http, old, old_protocol)
    book = books["ethbtc"]
    assert book.state is BookState.LIVE
    old.message_received(diff("ethbtc", 101, 101, [("1.1", "1")]))

    feed.rotate(old, "test")
    successor = feed.connector.started[-1]
    new_protocol = open_connection(successor, clock)
    assert new_protocol.frames() == [{"method": "SUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 2}]
    successor.message_received(orjson.dumps({"result": None, "id": 2}))
    assert http.pending(f"{REST}/api/v3/depth") == []  # no snapshot needed

    successor.message_received(diff("ethbtc", 102, 103, [("1.2", "1")]))  # contiguous: applied
    successor.message_received(diff("ethbtc", 105, 105, [("1.4", "1")]))  # ahead of old: held
    old.message_received(diff("ethbtc", 102, 103, [("1.2", "1")]))        # duplicate
    old.message_received(diff("ethbtc", 104, 104, [("1.3", "1")]))
    assert book.state is BookState.LIVE
    assert book.book.top_bids(1) == [(1.3, 1.0)]

    clock.advance(feed.settings.handover_overlap)
    assert feed.connections == [successor]
    assert feed.adapter.syncs["ethbtc"].connection is successor
    assert book.book.top_bids(1) == [(1.4, 1.0)]
    old.message_received(diff("ethbtc", 106, 106, [("9", "1")]))  # the old one is ignored now
    successor.message_received(diff("ethbtc", 106, 106, [("1.5", "1")]))
    assert book.book.top_bids(1) == [(1.5, 1.0)]
    assert book.state is BookState.LIVE
    old.connection_closed(old_protocol, "closed by us")
    assert book.state is BookState.LIVE


def test_old_connection_dying_mid_handover_promotes_the_successor():
    feed, clock, http, books = make_feed(BinanceAdapter)
    old = feed.connections[0]
    old_protocol = open_connection(old, clock)
    live_binance(feed, clock, http, old, old_protocol)
    feed.rotate(old, "test")
    successor = feed.connector.started[-1]
    new_protocol = open_connection(successor, clock)
    old.connection_closed(old_protocol, "code=1006")
    assert feed.connections == [successor]
    assert books["ethbtc"].state is BookState.STALE
    # The successor already streams the symbol: resync from it, no new SUBSCRIBE.
    clock.advance(1)
    assert [f["method"] for f in new_protocol.frames()] == ["SUBSCRIBE"]
    http.answer(f"{REST}/api/v3/depth", {"lastUpdateId": 500, "bids": [["1", "1"]], "asks": []})
    assert books["ethbtc"].state is BookState.LIVE


def test_symbols_beyond_one_connection_open_more_connections():
    feed, clock, http, books = make_feed(BinanceAdapter, symbols=(), max_symbols_per_connection=2)
    feed.connector.started.clear()
    for i in range(5):
        feed.watch(ExchangeBook("binance", f"s{i}", ignore))
    clock.advance(0)
    assert [len(shard.symbols) for shard in feed.pool.shards] == [2, 2, 1]
    assert len(feed.connector.started) == 2  # the two new ones were started
    feed.unwatch("s4")
    clock.advance(0)
    assert len(feed.connections) == 2  # emptied extra connection closed


def mismatches():
    return REGISTRY.get_sample_value(
        "aggregator_resyncs_total", {"exchange": "bitstamp", "reason": "verify_mismatch"}) or 0.0


def test_bitstamp_book_verified_against_newer_rest_snapshot():
    before = mismatches()
    feed, clock, http, books = make_feed(BitstampAdapter)
    protocol = open_connection(feed.connections[0], clock)
    clock.advance(1)
    feed.connections[0].message_received(
        b'{"event":"bts:subscription_succeeded","channel":"order_book_ethbtc","data":{}}')
    http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": "1000", "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})
    assert books["ethbtc"].state is BookState.LIVE
    pass_time(clock, feed.connections[0], feed.adapter.verify_interval + 10)
    http.answer(f"{REST}/api/v2/order_book/ethbtc/", {   # same levels, newer: fine
        "microtimestamp": "2000", "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})
    assert mismatches() == before
    pass_time(clock, feed.connections[0], feed.adapter.verify_interval + 10)
    http.answer(f"{REST}/api/v2/order_book/ethbtc/", {   # the channel missed a change
        "microtimestamp": "3000", "bids": [["0.051", "2"]], "asks": [["0.06", "1"]]})
    assert mismatches() == before + 1
    assert books["ethbtc"].book.top_bids(1) == [(0.051, 2.0)]
    assert not protocol.dropped
