"""The Coinbase adapter on a Clock with a fake connection: level2 sync,
sequence gaps, bad data, subscription errors, heartbeats and handover."""

import orjson
import pytest
from prometheus_client import REGISTRY

from aggregator.book import BookState, ExchangeBook
from aggregator.exchanges.coinbase import CoinbaseAdapter, SyncState
from tests.fakes import FakeProtocol, FeedHarness

NOW = 1_700_000_000.0


def metric(name, **labels):
    return REGISTRY.get_sample_value(f"aggregator_{name}_total", labels) or 0.0


def product(product_id, **overrides):
    base, quote = product_id.split("-")
    entry = {"product_id": product_id, "base_currency_id": base, "quote_currency_id": quote,
             "status": "online", "trading_disabled": False, "product_type": "SPOT",
             "alias": "", "alias_to": []}
    entry.update(overrides)
    return entry


DOCUMENT = {"products": [product("BTC-USD"), product("ETH-BTC"), product("ETH-USD")],
            "num_products": 3}


class Harness(FeedHarness):
    def __init__(self, symbols=("btcusd", "ethbtc")):
        super().__init__(CoinbaseAdapter, symbols, start_time=NOW, document=DOCUMENT)
        self.sequence = {}

    def send(self, channel, events, connection=None, sequence=None):
        """One message of `connection`'s sequence (the next number unless given)."""
        connection = connection or self.connection
        if sequence is None:
            sequence = self.sequence.get(connection, 0)
        self.sequence[connection] = sequence + 1
        connection.message_received(orjson.dumps({
            "channel": channel, "client_id": "", "timestamp": "2023-11-14T22:13:20Z",
            "sequence_num": sequence, "events": events}))

    def snapshot(self, product_id, bids=(("100", "1"),), asks=(("101", "1"),), connection=None):
        self.send("l2_data", [event("snapshot", product_id, bids, asks)], connection)

    def update(self, product_id, bids=(), asks=(), connection=None):
        self.send("l2_data", [event("update", product_id, bids, asks)], connection)

    def wait(self, seconds):
        """Let time pass in small steps: a Clock runs everything due within one
        advance() at its end time, which would bunch up the paced frames."""
        for _ in range(round(seconds / 0.05)):
            self.clock.advance(0.05)

    def heartbeat(self, connection=None):
        self.send("heartbeats", [{"current_time": "now", "heartbeat_counter": 1}], connection)

    def live(self):
        self.clock.advance(1)  # frames are paced
        self.snapshot("BTC-USD")
        self.snapshot("ETH-BTC", [("0.05", "2")], [("0.051", "3")])
        assert all(book.state is BookState.LIVE for book in self.books.values())


def event(kind, product_id, bids=(), asks=()):
    return {"type": kind, "product_id": product_id, "updates": [
        *({"side": "bid", "event_time": "t", "price_level": p, "new_quantity": q} for p, q in bids),
        *({"side": "offer", "event_time": "t", "price_level": p, "new_quantity": q} for p, q in asks),
    ]}


def test_symbol_list_keeps_online_spot_products_that_are_not_aliases():
    adapter = Harness().feed.adapter
    document = {"products": [
        product("BTC-USD"),
        product("BTC-USDC", alias="BTC-USD"),  # streams the BTC-USD book
        product("ETH-BTC", status="offline"),
        product("SOL-USD", trading_disabled=True),
        product("BIP-PERP", product_type="FUTURE", base_currency_id="BTC", quote_currency_id="USD"),
        product("XBT-EUR", base_currency_id=None, quote_currency_id=None),
    ]}
    listed = list(adapter.parse_symbol_list(document))
    assert [(i.native, i.symbol) for i in listed] == [("BTC-USD", "btcusd"), ("XBT-EUR", "btceur")]
    assert adapter.symbol_list_path() == "/api/v3/brokerage/market/products?product_type=SPOT"
    with pytest.raises(ValueError):
        list(adapter.parse_symbol_list({"products": [{**product("BTC-USD"), "product_id": "BTCUSD"}]}))


def test_subscribes_level2_in_one_frame_and_heartbeats_once():
    h = Harness()
    h.clock.advance(1)
    assert h.protocol.frames() == [
        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-BTC"], "channel": "level2"},
        {"type": "subscribe", "channel": "heartbeats"},
    ]
    book = ExchangeBook("coinbase", "ethusd", h._changed)
    h.feed.watch(book)
    h.clock.advance(1)
    assert h.protocol.frames()[2:] == [
        {"type": "subscribe", "product_ids": ["ETH-USD"], "channel": "level2"}]


def test_snapshot_then_updates_with_absolute_sizes():
    h = Harness()
    h.clock.advance(1)
    h.send("subscriptions", [{"subscriptions": {"level2": ["BTC-USD", "ETH-BTC"]}}])
    sync = h.feed.adapter.syncs["btcusd"]
    assert sync.state is SyncState.AWAITING_SNAPSHOT
    h.update("BTC-USD", [("99", "5")])  # nothing to apply it to yet: ignored
    h.snapshot("BTC-USD", [("100", "1"), ("99", "2"), ("98", "0")], [("101", "1")])
    book = h.books["btcusd"]
    assert book.state is BookState.LIVE and sync.state is SyncState.LIVE
    assert book.book.top_bids(5) == [(100.0, 1.0), (99.0, 2.0)]
    h.clock.advance(0.5)
    h.update("BTC-USD", [("100", "0"), ("99", "3")], [("101.5", "2")])
    assert book.book.top_bids(5) == [(99.0, 3.0)]
    assert book.book.top_asks(5) == [(101.0, 1.0), (101.5, 2.0)]
    assert h.arrivals[-1] == NOW + 1.5
    # A later snapshot replaces the book.
    h.snapshot("BTC-USD", [("90", "1")], [("91", "1")])
    assert book.book.top_bids(5) == [(90.0, 1.0)] and book.book.top_asks(5) == [(91.0, 1.0)]


def test_sequence_gap_withdraws_every_book_of_the_connection_and_reconnects():
    h = Harness()
    h.live()
    before = metric("resyncs", exchange="coinbase", reason="gap")
    h.heartbeat()
    h.send("l2_data", [event("update", "BTC-USD", [("100", "3")])], sequence=h.sequence[h.connection] + 2)
    assert all(book.state is BookState.STALE for book in h.books.values())
    assert all(book.book.top_bids(1) == [] for book in h.books.values())
    assert metric("resyncs", exchange="coinbase", reason="gap") == before + 2
    assert h.protocol.dropped
    h.snapshot("BTC-USD")  # what was still buffered on the dropped socket counts for nothing
    assert h.books["btcusd"].state is BookState.STALE
    # The reconnect subscribes everything again; its snapshots restore the books.
    h.connection.connection_closed(h.protocol, "dropped")
    h.protocol = FakeProtocol()
    h.connection.connection_opened(h.protocol)
    h.sequence.clear()
    h.live()
    assert h.protocol.frames()[0]["product_ids"] == ["BTC-USD", "ETH-BTC"]


def test_the_first_message_of_a_socket_may_start_anywhere():
    h = Harness()
    h.clock.advance(1)
    h.send("subscriptions", [{"subscriptions": {}}], sequence=41)
    h.snapshot("BTC-USD")
    assert h.books["btcusd"].state is BookState.LIVE


@pytest.mark.parametrize("sequence", ["7", None, [7], 7.0, True])
def test_unreadable_sequence_number_is_rejected_and_resyncs_the_connection(sequence):
    h = Harness()
    h.live()
    before = metric("rejects", exchange="coinbase", reason="bad_sequence")
    h.connection.message_received(orjson.dumps({"channel": "l2_data", "sequence_num": sequence,
                                                "events": [event("update", "BTC-USD")]}))
    assert metric("rejects", exchange="coinbase", reason="bad_sequence") == before + 1
    assert h.protocol.dropped and h.books["ethbtc"].state is BookState.STALE


@pytest.mark.parametrize("events", [None, "x", [None], [{"type": "update"}], [{"product_id": 5}]])
def test_l2_data_naming_no_product_resyncs_the_connection(events):
    h = Harness()
    h.live()
    before = metric("rejects", exchange="coinbase", reason="bad_data")
    h.send("l2_data", events)
    assert metric("rejects", exchange="coinbase", reason="bad_data") == before + 1
    assert h.protocol.dropped


@pytest.mark.parametrize("updates", [
    [{"side": "bid", "price_level": "NaN", "new_quantity": "1"}],
    [{"side": "bid", "price_level": "100", "new_quantity": "-1"}],
    [{"side": "offer", "price_level": "Infinity", "new_quantity": "1"}],
    [{"side": "bid", "price_level": "0", "new_quantity": "1"}],
    [{"side": "bid", "price_level": ["100"], "new_quantity": 1.0}],
    [{"side": "ask", "price_level": "100", "new_quantity": "1"}],
    [["bid", "100", "1"]],
    "garbage",
])
def test_bad_update_resyncs_that_product_alone_by_subscribing_it_again(updates):
    h = Harness()
    h.live()
    sent = len(h.protocol.sent)
    rejects = sum(metric("rejects", exchange="coinbase", reason=r) for r in ("bad_number", "bad_data"))
    resyncs = metric("resyncs", exchange="coinbase", reason="bad_data")
    h.send("l2_data", [{"type": "update", "product_id": "ETH-BTC", "updates": updates}])
    ethbtc = h.books["ethbtc"]
    assert ethbtc.state is BookState.STALE and ethbtc.book.top_bids(1) == []
    assert h.books["btcusd"].state is BookState.LIVE
    assert sum(metric("rejects", exchange="coinbase", reason=r)
               for r in ("bad_number", "bad_data")) == rejects + 1
    assert metric("resyncs", exchange="coinbase", reason="bad_data") == resyncs + 1
    h.wait(1)
    assert h.protocol.frames()[sent:] == [
        {"type": "unsubscribe", "product_ids": ["ETH-BTC"], "channel": "level2"},
        {"type": "subscribe", "product_ids": ["ETH-BTC"], "channel": "level2"},
    ]
    assert not h.protocol.dropped
    h.snapshot("ETH-BTC", [("0.05", "7")], [("0.06", "1")])
    assert ethbtc.state is BookState.LIVE and ethbtc.book.top_bids(1) == [(0.05, 7.0)]


def test_a_product_failing_again_before_it_is_live_backs_off():
    h = Harness()
    h.live()
    h.feed.retry_policy = lambda attempt: 2.0 * (attempt + 1)
    h.update("ETH-BTC", [("nan", "1")])
    h.wait(1)  # the first resync asks at once
    h.snapshot("ETH-BTC", [("0.06", "1")], [("0.05", "1")])  # crossed: again
    sent = len(h.protocol.sent)
    h.wait(3.9)
    assert len(h.protocol.sent) == sent  # the second waits retry_delay(1) = 4 s
    h.wait(0.6)
    assert len(h.protocol.sent) == sent + 2
    h.snapshot("ETH-BTC", [("0.05", "1")], [("0.06", "1")])
    assert h.books["ethbtc"].state is BookState.LIVE


def test_crossed_book_resyncs_that_product():
    h = Harness()
    h.live()
    before = metric("crossed_books", exchange="coinbase")
    h.update("ETH-BTC", [("0.052", "1")])
    assert h.books["ethbtc"].state is BookState.STALE
    assert metric("crossed_books", exchange="coinbase") == before + 1
    assert metric("resyncs", exchange="coinbase", reason="crossed") >= 1


def test_error_reply_retries_the_waiting_subscriptions_with_backoff():
    h = Harness()
    h.clock.advance(1)
    h.snapshot("BTC-USD")  # answered: not retried
    before = metric("subscribe_retries", exchange="coinbase", reason="refused")
    h.connection.message_received(orjson.dumps({"type": "error", "message": "Failed to subscribe"}))
    assert metric("subscribe_retries", exchange="coinbase", reason="refused") == before + 1
    assert h.books["ethbtc"].state is BookState.SYNCING
    assert "refused" in h.books["ethbtc"].reason
    sent = len(h.protocol.sent)
    h.clock.advance(h.feed.retry_delay(0) + 1)
    assert h.protocol.frames()[sent:] == [
        {"type": "subscribe", "product_ids": ["ETH-BTC"], "channel": "level2"}]
    h.snapshot("ETH-BTC")
    assert h.books["ethbtc"].state is BookState.LIVE


def test_no_snapshot_in_time_subscribes_again():
    h = Harness(["btcusd"])
    before = metric("subscribe_retries", exchange="coinbase", reason="timeout")
    h.clock.advance(1)
    h.clock.advance(h.feed.settings.reply_timeout)
    assert metric("subscribe_retries", exchange="coinbase", reason="timeout") == before + 1
    h.clock.advance(1)
    assert h.protocol.frames()[-1] == {
        "type": "subscribe", "product_ids": ["BTC-USD"], "channel": "level2"}


def test_unknown_channels_are_ignored_but_counted_in_the_sequence():
    h = Harness()
    h.live()
    rejects = metric("rejects", exchange="coinbase", reason="unexpected")
    h.send("status_v9", [{"anything": 1}])
    h.update("BTC-USD", [("100.5", "1")])
    assert h.books["btcusd"].book.top_bids(1) == [(100.5, 1.0)]
    assert metric("rejects", exchange="coinbase", reason="unexpected") == rejects
    h.connection.message_received(b"[1, 2]")
    assert metric("rejects", exchange="coinbase", reason="unexpected") == rejects + 1
    h.connection.message_received(b'{"channel": "news", "events": []}')  # unnumbered: ignored
    h.update("BTC-USD", [("100.6", "1")])
    assert h.books["btcusd"].state is BookState.LIVE
    assert h.books["btcusd"].book.top_bids(1) == [(100.6, 1.0)]


def test_a_numbered_error_counts_in_the_sequence():
    h = Harness()
    h.live()
    h.connection.message_received(orjson.dumps(
        {"type": "error", "message": "x", "sequence_num": h.sequence[h.connection]}))
    h.sequence[h.connection] += 1
    h.update("BTC-USD", [("100.5", "1")])
    assert not h.protocol.dropped and h.books["btcusd"].state is BookState.LIVE


def test_unwatch_unsubscribes_and_ignores_late_messages():
    h = Harness()
    h.live()
    h.feed.unwatch("btcusd")
    h.clock.advance(1)
    assert h.protocol.frames()[-1] == {
        "type": "unsubscribe", "product_ids": ["BTC-USD"], "channel": "level2"}
    h.update("BTC-USD", [("100", "9")])
    assert "btcusd" not in h.feed.adapter.syncs
    assert h.books["ethbtc"].state is BookState.LIVE


def test_heartbeats_stopping_while_data_flows_replace_the_connection():
    h = Harness()
    h.live()
    timeout = h.feed.adapter.heartbeat_timeout
    for _ in range(int(timeout) + 2):
        h.clock.advance(1)
        h.update("BTC-USD", [("99", "1")])  # data, but no heartbeat
    assert len(h.connector.started) == 2  # a successor, make-before-break
    assert h.feed.pool.predecessor(h.connector.started[-1]) is h.connection
    assert all(book.state is BookState.LIVE for book in h.books.values())


def test_heartbeats_keep_a_connection_and_total_silence_is_left_to_the_inactivity_timeout():
    h = Harness()
    h.live()
    for _ in range(10):
        h.clock.advance(1)
        h.heartbeat()
    assert len(h.connector.started) == 1
    h.clock.advance(h.feed.settings.inactivity_timeout + 2)  # nothing at all
    assert len(h.connector.started) == 1 and h.protocol.dropped


def test_a_connection_without_symbols_subscribes_heartbeats_before_the_5s_deadline():
    h = Harness(symbols=())
    h.clock.advance(4)
    assert h.protocol.frames() == [{"type": "subscribe", "channel": "heartbeats"}]


def test_handover_follows_the_successor_from_its_snapshot_on():
    h = Harness()
    h.live()
    h.feed.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    new_protocol = FakeProtocol()
    successor.connection_opened(new_protocol)
    h.wait(0.5)
    assert new_protocol.frames() == [
        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-BTC"], "channel": "level2"},
        {"type": "subscribe", "channel": "heartbeats"}]
    btcusd, ethbtc = h.books["btcusd"], h.books["ethbtc"]
    # The successor's snapshot takes over btcusd at once; the book stays live.
    h.snapshot("BTC-USD", [("200", "1")], [("201", "1")], connection=successor)
    assert btcusd.state is BookState.LIVE and btcusd.book.top_bids(1) == [(200.0, 1.0)]
    h.update("BTC-USD", [("150", "1")])  # the old connection's: ignored from now on
    h.update("BTC-USD", [("199", "1")], connection=successor)
    assert btcusd.book.top_bids(2) == [(200.0, 1.0), (199.0, 1.0)]
    # ethbtc still follows the old connection until the handover...
    h.update("ETH-BTC", [("0.049", "1")], connection=successor)
    h.update("ETH-BTC", [("0.0495", "1")])
    assert ethbtc.book.top_bids(2) == [(0.05, 2.0), (0.0495, 1.0)]
    h.clock.advance(h.feed.settings.handover_overlap)
    assert h.feed.connections == [successor]
    # ...which leaves it waiting for the successor's snapshot.
    assert ethbtc.state is BookState.SYNCING and btcusd.state is BookState.LIVE
    h.snapshot("ETH-BTC", connection=successor)
    assert ethbtc.state is BookState.LIVE


def test_a_gap_on_the_successor_resyncs_only_the_books_that_follow_it():
    h = Harness()
    h.live()
    h.feed.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    new_protocol = FakeProtocol()
    successor.connection_opened(new_protocol)
    h.clock.advance(0.5)
    h.snapshot("BTC-USD", connection=successor)
    h.send("heartbeats", [], connection=successor, sequence=h.sequence[successor] + 5)
    assert new_protocol.dropped and not h.protocol.dropped
    assert h.books["btcusd"].state is BookState.STALE
    assert h.books["ethbtc"].state is BookState.LIVE
