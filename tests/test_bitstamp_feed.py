import orjson
import pytest

from aggregator.book import BookState
from aggregator.exchanges.bitstamp import BitstampAdapter
from tests import recorded
from tests.fakes import FakeProtocol, FeedHarness

REST = "http://rest.test"


def book_message(pair, micros, bids=(), asks=()):
    return orjson.dumps({"data": {"timestamp": str(micros // 10**6), "microtimestamp": str(micros),
                                  "bids": [list(b) for b in bids], "asks": [list(a) for a in asks]},
                         "channel": f"order_book_{pair}", "event": "data"})


class Harness(FeedHarness):
    def __init__(self, symbols=("ethbtc",)):
        super().__init__(BitstampAdapter, symbols, start_time=1700000000)

    def ack_all(self):
        self.clock.advance(1)  # frames are paced
        for frame in self.protocol.frames():
            if frame["event"] == "bts:subscribe":
                self.receive(orjson.dumps({"event": "bts:subscription_succeeded",
                                           "channel": frame["data"]["channel"], "data": {}}))


def test_subscribes_order_book_channel_and_seeds_from_rest_once_acknowledged():
    h = Harness(["ethbtc", "btcusd"])
    h.clock.advance(0.1)  # frames are paced
    assert h.protocol.frames() == [
        {"event": "bts:subscribe", "data": {"channel": "order_book_btcusd"}},
        {"event": "bts:subscribe", "data": {"channel": "order_book_ethbtc"}}]
    # A snapshot taken before the channel runs could miss a change for good.
    assert h.http.pending(f"{REST}/api/v2/order_book") == []
    h.ack_all()
    assert [url for url, _ in h.http.pending(f"{REST}/api/v2/order_book")] == [  # with a cache-buster
        f"{REST}/api/v2/order_book/btcusd/?_=1700000001100",
        f"{REST}/api/v2/order_book/ethbtc/?_=1700000001100"]
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "timestamp": "1", "microtimestamp": "1000", "bids": [["0.05", "1.5"]], "asks": [["0.06", "2"]]})
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(10) == [(0.05, 1.5)]


def test_each_newer_message_replaces_the_book_and_older_ones_are_ignored():
    h = Harness()
    h.receive(book_message("ethbtc", 2000, [("0.05", "1")], [("0.06", "1")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    h.receive(book_message("ethbtc", 3000, [("0.049", "2")], [("0.061", "1")]))
    assert h.books["ethbtc"].book.top_bids(10) == [(0.049, 2.0)]
    h.ack_all()
    # The stream beat the acknowledgement with a whole book: no seed needed.
    assert h.http.pending(f"{REST}/api/v2/order_book") == []
    h.feed.adapter.syncs["ethbtc"].fetch("snapshot")
    # A REST answer older than the stream is ignored.
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "timestamp": "0", "microtimestamp": "2500", "bids": [["0.01", "1"]], "asks": []})
    assert h.books["ethbtc"].book.top_bids(10) == [(0.049, 2.0)]
    h.receive(book_message("ethbtc", 3000, [("0.01", "1")], []))
    assert h.books["ethbtc"].book.top_bids(10) == [(0.049, 2.0)]


@pytest.mark.parametrize("bids", [[("nan", "1")], [("0.05", "-1")], [("0.05", "inf")],
                                  [("x", "1")], [("0.05",)], "garbage"])
def test_bad_message_withholds_the_book_until_the_next_good_one(bids):
    h = Harness()
    h.receive(book_message("ethbtc", 2000, [("0.05", "1")], [("0.06", "1")]))
    h.receive(orjson.dumps({"data": {"microtimestamp": "3000", "bids": bids, "asks": []},
                                          "channel": "order_book_ethbtc", "event": "data"}))
    assert h.books["ethbtc"].state is BookState.STALE
    assert h.books["ethbtc"].book.top_bids(10) == []
    h.receive(book_message("ethbtc", 4000, [("0.05", "3")], [("0.06", "1")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(10) == [(0.05, 3.0)]


@pytest.mark.parametrize("data", [None, {}, {"microtimestamp": "abc", "bids": [], "asks": []},
                                  {"microtimestamp": "5000", "asks": []}])
def test_malformed_data_is_rejected(data):
    h = Harness()
    h.receive(orjson.dumps({"data": data, "channel": "order_book_ethbtc", "event": "data"}))
    assert h.books["ethbtc"].state is BookState.STALE


def test_request_reconnect_replaces_the_connection_make_before_break():
    h = Harness()
    rotations = []
    h.feed.rotate = lambda connection, reason: rotations.append((connection, reason))
    h.receive(b'{"event":"bts:request_reconnect","channel":"","data":""}')
    assert rotations == [(h.connection, "bitstamp asked us to reconnect")]
    assert not h.protocol.dropped  # the old connection serves until the new one took over


def test_errors_and_unknown_frames_do_not_break_the_feed():
    h = Harness()
    for frame in [b'{"event":"bts:error","channel":"","data":{"code":null,"message":"Bad subscription string."}}',
                  b"not json", b"[]", b'{"event":"trade","channel":"live_trades_ethbtc","data":{}}',
                  b'{"event":"bts:subscription_succeeded","channel":"order_book_ethbtc","data":{}}',
                  b'{"event":"data","channel":"order_book_nosuch","data":{}}']:
        h.receive(frame)
    h.receive(book_message("ethbtc", 2000, [("0.05", "1")], []))
    assert h.books["ethbtc"].state is BookState.LIVE


def test_unwatch_unsubscribes_and_ignores_late_messages():
    h = Harness()
    h.ack_all()
    (_, seed), = h.http.pending(f"{REST}/api/v2/order_book")
    h.feed.unwatch("ethbtc")
    assert seed.called  # cancelled, quietly
    h.clock.advance(0)
    h.clock.advance(0.1)  # frames are paced
    assert h.protocol.frames()[-1] == {"event": "bts:unsubscribe", "data": {"channel": "order_book_ethbtc"}}
    h.receive(book_message("ethbtc", 2000, [("0.05", "1")], []))


def test_disconnect_marks_stale_and_reconnect_resubscribes():
    h = Harness()
    h.receive(book_message("ethbtc", 2000, [("0.05", "1")], []))
    h.connection.connection_closed(h.protocol, "code=1006")
    assert h.books["ethbtc"].state is BookState.STALE
    protocol = FakeProtocol()
    h.connection.connection_opened(protocol)
    h.clock.advance(0)
    assert protocol.frames() == [{"event": "bts:subscribe", "data": {"channel": "order_book_ethbtc"}}]
    h.receive(book_message("ethbtc", 1000, [("0.05", "1")], []))  # new connection: any time
    assert h.books["ethbtc"].state is BookState.LIVE


def test_recorded_snapshot_seeds_the_book():
    h = Harness(["ethusd"])
    line = next(l for l in recorded.read("BITSTAMP.http.0.0") if l.url.endswith("/ethusd"))
    document = orjson.loads(line.payload)
    h.ack_all()
    h.http.answer(f"{REST}/api/v2/order_book/ethusd/", document)
    book = h.books["ethusd"].book
    assert book.top_bids(1) == [(float(document["bids"][0][0]), float(document["bids"][0][1]))]
    assert book.depth() == (len(document["bids"]), len(document["asks"]))
