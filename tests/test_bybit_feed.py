import orjson
import pytest
from prometheus_client import REGISTRY

from aggregator.book import BookState, ExchangeBook
from aggregator.exchanges.bybit import BybitAdapter, SyncState, topic_depth
from tests.fakes import FakeProtocol, FeedHarness

PAIRS = {"ethbtc": ("ETH", "BTC"), "btcusdt": ("BTC", "USDT"), "ethusdt": ("ETH", "USDT")}


def listing(symbols, status="Trading"):
    entries = []
    for symbol in symbols:
        base, quote = PAIRS.get(symbol) or (symbol[:3].upper(), symbol[3:].upper())
        entries.append({"symbol": symbol.upper(), "baseCoin": base, "quoteCoin": quote,
                        "status": status})
    return {"retCode": 0, "retMsg": "OK", "result": {"category": "spot", "list": entries}}


def book_message(kind, u, bids=(), asks=(), symbol="ETHBTC", depth=50):
    return orjson.dumps({"topic": f"orderbook.{depth}.{symbol}", "type": kind, "ts": 1,
                         "data": {"s": symbol, "b": [list(b) for b in bids],
                                  "a": [list(a) for a in asks], "u": u, "seq": 7}, "cts": 1})


def metric(name, **labels):
    return REGISTRY.get_sample_value(f"aggregator_{name}_total", labels) or 0.0


class Harness(FeedHarness):
    def __init__(self, symbols=("ethbtc",), listed=()):
        super().__init__(BybitAdapter, symbols, start_time=1700000000,
                         document=listing([*symbols, *listed]))
        self.feed.retry_policy = lambda attempt: 0.5 * (attempt + 1)  # no jitter

    def sent(self, protocol=None):
        for _ in range(5):
            self.clock.advance(0.25)  # frames are paced
        return (protocol or self.protocol).frames()

    def reply(self, frame, success=True, ret_msg="", protocol_receive=None):
        message = orjson.dumps({"success": success, "ret_msg": ret_msg, "conn_id": "c1",
                                "req_id": frame["req_id"], "op": frame["op"]})
        (protocol_receive or self.receive)(message)

    def live(self, u=100, bids=(("1.0", "1"),), asks=(("2.0", "1"),)):
        for frame in self.sent():
            if frame["op"] == "subscribe":
                self.reply(frame)
        self.receive(book_message("snapshot", u, bids, asks))
        assert self.books["ethbtc"].state is BookState.LIVE

    @property
    def book(self):
        return self.books["ethbtc"]


def test_connects_to_the_spot_path_and_lists_only_trading_pairs():
    h = Harness()
    assert h.connection.url == "ws://ws.test/v5/public/spot"
    assert h.feed.symbol_list.url == "http://rest.test/v5/market/instruments-info?category=spot"
    adapter = h.feed.adapter
    document = listing(["ethbtc", "btcusdt"])
    document["result"]["list"][1]["status"] = "PreLaunch"
    assert [i.symbol for i in adapter.parse_symbol_list(document)] == ["ethbtc"]
    with pytest.raises(ValueError):
        adapter.parse_symbol_list({"retCode": 10001, "retMsg": "Illegal category"})


def test_subscribe_frames_carry_at_most_ten_topics():
    symbols = [f"sym{i:02}usdt" for i in range(12)]
    h = Harness([], listed=symbols)
    for symbol in symbols:
        h.feed.watch(ExchangeBook("bybit", symbol, h.changes.append))
    frames = h.sent()
    assert [len(f["args"]) for f in frames] == [10, 2]
    assert frames[0]["op"] == "subscribe" and frames[0]["args"][0] == "orderbook.50.SYM00USDT"
    assert frames[0]["req_id"] != frames[1]["req_id"]


@pytest.mark.parametrize("depth, topic", [(1, 50), (10, 50), (50, 50), (51, 200), (1000, 1000),
                                          (5000, 1000)])
def test_the_shallowest_topic_covering_the_served_depth(depth, topic):
    assert topic_depth(depth) == topic


def test_a_deeper_book_subscribes_the_deeper_topic():
    h = Harness([], listed=["ethbtc"])
    h.feed.watch(ExchangeBook("bybit", "ethbtc", h.changes.append, depth=100))
    assert h.sent()[0]["args"] == ["orderbook.200.ETHBTC"]
    h.receive(book_message("snapshot", 5, [("1", "1")], [("2", "1")], depth=50))
    assert not h.feed.books["ethbtc"].live  # another depth's topic is not this book's
    h.receive(book_message("snapshot", 5, [("1", "1")], [("2", "1")], depth=200))
    assert h.feed.books["ethbtc"].live


def test_snapshot_then_deltas_in_sequence():
    h = Harness()
    h.live(u=100, bids=[("1.0", "1"), ("0.9", "2")], asks=[("2.0", "1")])
    h.receive(book_message("delta", 101, bids=[("0.9", "0"), ("1.1", "3")], asks=[("2.5", "4")]))
    assert h.book.book.top_bids(5) == [(1.1, 3.0), (1.0, 1.0)]
    assert h.book.book.top_asks(5) == [(2.0, 1.0), (2.5, 4.0)]
    h.receive(book_message("delta", 101, bids=[("1.0", "9")]))  # already applied
    assert h.book.book.top_bids(1) == [(1.1, 3.0)]
    assert h.arrivals[-1] == h.clock.seconds()  # committed with the frame's arrival


def test_deltas_before_the_snapshot_are_ignored():
    h = Harness()
    h.receive(book_message("delta", 99, bids=[("5", "5")]))
    assert h.book.state is BookState.SYNCING
    h.receive(book_message("snapshot", 100, [("1", "1")], [("2", "1")]))
    assert h.book.book.top_bids(5) == [(1.0, 1.0)]


def test_gap_withdraws_and_resubscribes_for_a_fresh_snapshot():
    h = Harness()
    h.live(u=100)
    gaps = metric("resyncs", exchange="bybit", reason="gap")
    h.receive(book_message("delta", 102, bids=[("1.5", "1")]))
    assert h.book.state is BookState.STALE and h.book.book.top_bids(5) == []
    assert metric("resyncs", exchange="bybit", reason="gap") == gaps + 1
    unsubscribe, subscribe = h.sent()[-2:]
    assert (unsubscribe["op"], unsubscribe["args"]) == ("unsubscribe", ["orderbook.50.ETHBTC"])
    assert (subscribe["op"], subscribe["args"]) == ("subscribe", ["orderbook.50.ETHBTC"])
    # Until the unsubscribe is answered, what arrives is the old subscription's.
    h.receive(book_message("snapshot", 103, [("1", "1")], [("2", "1")]))
    assert h.book.state is BookState.STALE
    h.reply(unsubscribe)
    h.reply(subscribe)
    h.receive(book_message("snapshot", 110, [("1.2", "1")], [("2", "1")]))
    assert h.book.state is BookState.LIVE and h.book.book.top_bids(5) == [(1.2, 1.0)]
    h.receive(book_message("delta", 111, asks=[("2", "0"), ("3", "1")]))
    assert h.book.book.top_asks(5) == [(3.0, 1.0)]


def test_a_snapshot_mid_stream_replaces_the_book():
    h = Harness()
    h.live(u=100, bids=[("1.0", "1"), ("0.9", "2")])
    resyncs = sum(metric("resyncs", exchange="bybit", reason=r) for r in ("gap", "bad_data"))
    resets = metric("book_resets", exchange="bybit", reason="snapshot")
    h.receive(book_message("snapshot", 150, [("1.1", "5")], [("2.2", "1")]))
    assert h.book.state is BookState.LIVE
    assert metric("book_resets", exchange="bybit", reason="snapshot") == resets + 1
    assert h.book.book.top_bids(5) == [(1.1, 5.0)] and h.book.book.top_asks(5) == [(2.2, 1.0)]
    h.receive(book_message("delta", 151, bids=[("1.05", "1")]))
    assert h.book.book.top_bids(5) == [(1.1, 5.0), (1.05, 1.0)]
    assert sum(metric("resyncs", exchange="bybit", reason=r) for r in ("gap", "bad_data")) == resyncs


@pytest.mark.parametrize("kind", ["snapshot", "delta"])
def test_u_1_means_the_service_restarted_and_overwrites_the_book(kind):
    h = Harness()
    h.live(u=5000, bids=[("1.0", "1"), ("0.9", "2")])
    resets = metric("book_resets", exchange="bybit", reason="restart")
    h.receive(book_message(kind, 1, [("0.8", "1")], [("2.0", "3")]))
    assert h.book.state is BookState.LIVE
    assert metric("book_resets", exchange="bybit", reason="restart") == resets + 1
    assert h.book.book.top_bids(5) == [(0.8, 1.0)] and h.book.book.top_asks(5) == [(2.0, 3.0)]
    h.receive(book_message("delta", 2, bids=[("0.85", "1")]))
    assert h.book.book.top_bids(1) == [(0.85, 1.0)]


@pytest.mark.parametrize("level", [["nan", "1"], ["1.5", "-1"], ["inf", "1"], ["0", "1"],
                                   [["1.5"], 1.0], ["1.5"], "1.5"])
def test_bad_numbers_are_rejected_counted_and_resynced(level):
    h = Harness()
    h.live(u=100)
    rejects = metric("rejects", exchange="bybit", reason="bad_number")
    resyncs = metric("resyncs", exchange="bybit", reason="bad_data")
    h.receive(book_message("delta", 101, bids=[level]))
    assert h.book.state is BookState.STALE
    assert metric("rejects", exchange="bybit", reason="bad_number") == rejects + 1
    assert metric("resyncs", exchange="bybit", reason="bad_data") == resyncs + 1
    assert [f["op"] for f in h.sent()[-2:]] == ["unsubscribe", "subscribe"]


@pytest.mark.parametrize("u", ["101", 101.0, None, 0, -3, True])
def test_malformed_update_ids_are_rejected_and_resynced(u):
    h = Harness()
    h.live(u=100)
    rejects = metric("rejects", exchange="bybit", reason="bad_ids")
    h.receive(book_message("delta", u, bids=[("1.5", "1")]))
    assert h.book.state is BookState.STALE
    assert metric("rejects", exchange="bybit", reason="bad_ids") == rejects + 1


def test_malformed_json_unknown_messages_and_pongs_do_not_break_the_feed():
    h = Harness()
    h.live(u=100)
    unexpected = metric("rejects", exchange="bybit", reason="unexpected")
    h.receive(b'{"topic": "orderbook.50.ETH')
    h.receive(orjson.dumps({"success": True, "ret_msg": "pong", "conn_id": "c", "op": "ping"}))
    h.receive(orjson.dumps({"op": "pong", "args": ["1"]}))
    h.receive(orjson.dumps({"topic": "orderbook.50.ETHBTC", "type": "snapshot_v9",
                            "data": {"u": 101}}))
    h.receive(orjson.dumps({"topic": "publicTrade.ETHBTC", "data": []}))
    h.receive(orjson.dumps([1, 2]))
    assert metric("rejects", exchange="bybit", reason="unexpected") == unexpected + 3
    assert h.book.state is BookState.LIVE
    h.receive(book_message("delta", 101, bids=[("1.5", "1")]))
    assert h.book.book.top_bids(1) == [(1.5, 1.0)]


def test_a_crossed_book_is_out_of_sync():
    h = Harness()
    h.live(u=100)
    crossed = REGISTRY.get_sample_value("aggregator_crossed_books_total", {"exchange": "bybit"}) or 0
    h.receive(book_message("delta", 101, bids=[("2.5", "1")]))
    assert h.book.state is BookState.STALE
    assert metric("resyncs", exchange="bybit", reason="crossed") >= 1
    assert (REGISTRY.get_sample_value("aggregator_crossed_books_total", {"exchange": "bybit"})
            or 0) == crossed + 1


def test_levels_beyond_the_topic_window_are_trimmed():
    h = Harness()
    h.live(u=100, bids=[(str(1 + i / 100), "1") for i in range(50)], asks=[("3", "1")])
    h.receive(book_message("delta", 101, bids=[("2.0", "1")]))  # pushes 1.00 out of the top 50
    bids = h.book.book.top_bids(100)
    assert len(bids) == 50 and bids[-1] == (1.01, 1.0)


def test_refused_subscription_is_retried_with_backoff():
    h = Harness()
    h.feed.retry_policy = lambda attempt: 2.0 * (attempt + 1)
    refused = metric("subscribe_retries", exchange="bybit", reason="refused")
    (subscribe,) = h.sent()
    h.reply(subscribe, success=False, ret_msg="error:already subscribed,topic:orderbook.50.ETHBTC")
    assert h.book.state is BookState.SYNCING and "refused" in h.book.reason
    assert metric("subscribe_retries", exchange="bybit", reason="refused") == refused + 1
    frames = h.sent()
    assert [f["op"] for f in frames] == ["subscribe", "unsubscribe"]  # at once
    h.reply(frames[-1])
    h.clock.advance(0.5)
    assert h.sent()[-1]["op"] == "subscribe"  # after 2 s
    h.reply(h.sent()[-1], success=False, ret_msg="error:handler not found")
    h.reply(h.sent()[-1])  # its unsubscribe
    h.clock.advance(0.5)
    assert h.sent()[-1]["op"] == "unsubscribe"  # the backoff grows: 4 s
    h.clock.advance(1)
    subscribe = h.sent()[-1]
    assert subscribe["op"] == "subscribe"
    h.reply(subscribe)
    h.receive(book_message("snapshot", 3, [("1", "1")], [("2", "1")]))
    assert h.book.state is BookState.LIVE


def test_unanswered_subscribe_is_sent_again():
    h = Harness()
    timeouts = metric("subscribe_retries", exchange="bybit", reason="timeout")
    h.clock.advance(h.feed.settings.reply_timeout + 0.1)
    frames = h.sent()
    assert [f["op"] for f in frames] == ["subscribe", "unsubscribe", "subscribe"]
    assert metric("subscribe_retries", exchange="bybit", reason="timeout") == timeouts + 1
    h.reply(frames[1])
    h.reply(frames[2])
    h.clock.advance(60)
    assert len(h.sent()) == 3  # answered: no more retries
    h.receive(book_message("snapshot", 3, [("1", "1")], [("2", "1")]))
    assert h.book.state is BookState.LIVE


def test_an_unanswered_unsubscribe_stops_the_wait_for_it():
    h = Harness()
    h.live(u=100)
    h.receive(book_message("delta", 105))
    h.clock.advance(h.feed.settings.reply_timeout + 1)
    h.receive(book_message("snapshot", 110, [("1", "1")], [("2", "1")]))
    assert h.book.state is BookState.LIVE


def test_disconnect_marks_stale_and_reconnect_resubscribes():
    h = Harness()
    h.live(u=100)
    h.connection.connection_closed(h.protocol, "code=1006")
    assert h.book.state is BookState.STALE and h.feed.adapter.syncs == {}
    h.protocol = FakeProtocol()
    h.connection.connection_opened(h.protocol)
    assert h.sent()[0]["args"] == ["orderbook.50.ETHBTC"]
    assert h.book.state is BookState.SYNCING
    h.live(u=300)


def test_idle_connection_is_probed_with_an_application_ping():
    h = Harness([])
    h.clock.advance(h.feed.settings.inactivity_timeout / 2 + h.feed.settings.inactivity_timeout / 4)
    assert {"op": "ping"} in h.sent()


def successor_of(h):
    h.feed.pool.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    protocol = FakeProtocol()
    successor.connection_opened(protocol)
    return successor, protocol


def test_handover_takes_the_successors_data_and_skips_duplicates():
    h = Harness()
    h.live(u=100, bids=[("1.0", "1")])
    successor, protocol = successor_of(h)
    (subscribe,) = h.sent(protocol)
    assert subscribe["args"] == ["orderbook.50.ETHBTC"]
    # Either connection may answer first; the successor's own snapshot is older.
    h.reply(subscribe, protocol_receive=successor.message_received)
    successor.message_received(book_message("snapshot", 100, [("1.0", "1")], [("2", "1")]))
    successor.message_received(book_message("delta", 102, bids=[("1.2", "1")]))  # ahead
    h.receive(book_message("delta", 101, bids=[("1.1", "1")]))
    assert h.book.book.top_bids(5) == [(1.2, 1.0), (1.1, 1.0), (1.0, 1.0)]  # 102 caught up
    h.receive(book_message("delta", 102, bids=[("1.2", "1")]))  # duplicate
    h.clock.advance(h.feed.settings.handover_overlap + 1)
    assert h.feed.connections == [successor]
    h.receive(book_message("delta", 103, bids=[("9", "1")]))  # the old one no longer counts
    successor.message_received(book_message("delta", 103, bids=[("1.3", "1")]))
    assert h.book.state is BookState.LIVE and h.book.book.top_bids(1) == [(1.3, 1.0)]


def test_handover_with_the_successor_ahead_of_a_gap_resyncs():
    h = Harness()
    h.live(u=100)
    successor, protocol = successor_of(h)
    h.reply(h.sent(protocol)[0], protocol_receive=successor.message_received)
    successor.message_received(book_message("delta", 105, bids=[("1.2", "1")]))
    h.clock.advance(h.feed.settings.handover_overlap + 1)
    assert h.book.state is BookState.STALE
    assert h.feed.adapter.syncs["ethbtc"].state is SyncState.SUBSCRIBING
    frames = h.sent(protocol)
    assert [f["op"] for f in frames[-2:]] == ["unsubscribe", "subscribe"]


def test_handover_during_a_resync_resubscribes_on_the_successor():
    h = Harness()
    h.live(u=100)
    successor, protocol = successor_of(h)
    h.reply(h.sent(protocol)[0], protocol_receive=successor.message_received)
    successor.message_received(book_message("snapshot", 100, [("1", "1")], [("2", "1")]))
    h.receive(book_message("delta", 103))  # a gap on the old connection: its resync begins
    assert h.book.state is BookState.STALE
    h.clock.advance(h.feed.settings.handover_overlap + 1)
    assert h.feed.connections == [successor]
    unsubscribe, subscribe = h.sent(protocol)[-2:]
    assert (unsubscribe["op"], subscribe["op"]) == ("unsubscribe", "subscribe")
    h.reply(unsubscribe, protocol_receive=successor.message_received)
    h.reply(subscribe, protocol_receive=successor.message_received)
    successor.message_received(book_message("snapshot", 120, [("1.5", "1")], [("2", "1")]))
    assert h.book.state is BookState.LIVE and h.book.book.top_bids(1) == [(1.5, 1.0)]


def test_unwatching_a_deeper_book_unsubscribes_its_own_topic():
    h = Harness([], listed=["ethbtc"])
    h.feed.watch(ExchangeBook("bybit", "ethbtc", h.changes.append, depth=100))
    assert h.sent()[0]["args"] == ["orderbook.200.ETHBTC"]
    h.feed.unwatch("ethbtc")
    unsubscribe = h.sent()[-1]
    assert (unsubscribe["op"], unsubscribe["args"]) == ("unsubscribe", ["orderbook.200.ETHBTC"])
    h.receive(book_message("snapshot", 5, [("1", "1")], [("2", "1")], depth=200))  # late: ignored
    assert h.feed.adapter.syncs == {}


@pytest.mark.parametrize("data", [None, [], "x"])
def test_a_message_without_data_is_rejected_and_resynced(data):
    h = Harness()
    h.live(u=100)
    rejects = metric("rejects", exchange="bybit", reason="bad_data")
    h.receive(orjson.dumps({"topic": "orderbook.50.ETHBTC", "type": "delta", "data": data}))
    assert h.book.state is BookState.STALE
    assert metric("rejects", exchange="bybit", reason="bad_data") == rejects + 1


def test_rewatched_before_the_unsubscribe_left_gets_a_fresh_snapshot():
    """Unwatched and watched again in one turn (a NATS lease released and
    claimed back): the topic never stopped, so no snapshot would ever come on
    its own; the book was left syncing for good. It resubscribes instead."""
    from aggregator.book import ExchangeBook

    h = Harness()
    h.live(u=100)
    sent = len(h.sent())
    h.feed.unwatch("ethbtc")
    book = h.books["ethbtc"] = ExchangeBook("bybit", "ethbtc", h._changed)
    h.feed.watch(book)
    unsubscribe, subscribe = h.sent()[sent:]
    assert (unsubscribe["op"], subscribe["op"]) == ("unsubscribe", "subscribe")
    h.receive(book_message("delta", 101, bids=[("1.5", "1")]))  # the old subscription's
    assert book.state is BookState.SYNCING
    h.reply(unsubscribe)
    h.reply(subscribe)
    h.receive(book_message("snapshot", 120, [("1.2", "1")], [("2", "1")]))
    assert book.state is BookState.LIVE and book.book.top_bids(5) == [(1.2, 1.0)]
