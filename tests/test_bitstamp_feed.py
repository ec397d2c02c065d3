import orjson
import pytest

from aggregator.book import BookState
from aggregator.exchanges.bitstamp import BitstampAdapter, BookFrame
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
    # The served depth (and one level more) is read; the rest waits for the verification.
    expected = sorted(((float(p), float(a)) for p, a in document["bids"]), reverse=True)[:10]
    assert book.top_bids(10) == expected
    assert book.depth() == (11, 11)
    sync = h.feed.adapter.syncs["ethusd"]
    assert len(sync.held.levels()[0]) == 100  # kept for the verification: the top 100, not thousands


def levels(start, step, count, amount="1"):
    return [(f"{start + i * step:.2f}", amount) for i in range(count)]


def test_a_message_whose_served_levels_did_not_change_is_not_parsed_or_published():
    h = Harness()
    bids, asks = levels(100, -0.01, 100), levels(101, 0.01, 100)
    h.receive(book_message("ethbtc", 2000, bids, asks))
    published = len(h.changes)
    deeper = bids[:11] + levels(50, -0.01, 89, amount="7")  # only beyond the served 10 (+1)
    h.receive(book_message("ethbtc", 3000, deeper, asks))
    assert len(h.changes) == published
    sync = h.feed.adapter.syncs["ethbtc"]
    assert sync.held_time == 3000 and sync.held.levels()[0][50] == list(deeper[50])
    h.receive(book_message("ethbtc", 2500, [("1", "1")], asks))  # still ordered by time
    assert h.books["ethbtc"].book.top_bids(1) == [(100.0, 1.0)]
    h.receive(book_message("ethbtc", 4000, [("100.00", "5")] + bids[1:], asks))
    assert len(h.changes) == published + 1
    assert h.books["ethbtc"].book.top_bids(2) == [(100.0, 5.0), (99.99, 1.0)]


@pytest.mark.parametrize("swap", [(0, 3), (9, 10), (0, 10)])
def test_a_message_out_of_the_documented_order_is_read_whole(swap):
    h = Harness()
    bids, asks = levels(100, -0.01, 100), levels(101, 0.01, 100)
    i, j = swap
    bids[i], bids[j] = bids[j], bids[i]
    asks[i], asks[j] = asks[j], asks[i]
    h.receive(book_message("ethbtc", 2000, bids, asks))
    assert h.books["ethbtc"].book.top_bids(10) == [(round(100 - k * 0.01, 2), 1.0) for k in range(10)]
    assert h.books["ethbtc"].book.top_asks(10) == [(round(101 + k * 0.01, 2), 1.0) for k in range(10)]
    # The next message in order is read from its start again.
    h.receive(book_message("ethbtc", 3000, levels(100, -0.01, 100), levels(101, 0.01, 100)))
    assert h.books["ethbtc"].book.depth() == (11, 11)


def seeded():
    """A harness whose book was seeded by a REST snapshot, and the reactor time in µs."""
    h = Harness()
    h.ack_all()
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": "1000", "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})
    return h, int(h.clock.seconds() * 1e6)


def verify_against_a_newer_snapshot(h, now_us):
    """The periodic verification comes round; the REST snapshot it fetches is newer."""
    h.clock.advance(h.feed.adapter.verify_interval + 5)
    h.connection.activity()
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": str(now_us + 10**6), "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})


def test_a_bad_level_beyond_the_served_depth_is_caught_by_the_verification():
    h, now_us = seeded()
    bids = levels(100, -0.01, 100)
    bids[60] = ("NaN", "1")
    h.receive(book_message("ethbtc", now_us, bids, levels(101, 0.01, 100)))
    assert h.books["ethbtc"].state is BookState.LIVE  # what it serves is sound
    verify_against_a_newer_snapshot(h, now_us)
    assert h.books["ethbtc"].state is BookState.STALE


def test_the_verification_compares_levels_beyond_the_served_depth():
    from prometheus_client import REGISTRY

    def mismatches():
        return REGISTRY.get_sample_value(
            "aggregator_resyncs_total", {"exchange": "bitstamp", "reason": "verify_mismatch"}) or 0.0

    h = Harness()
    h.ack_all()
    bids, asks = levels(100, -0.01, 100), levels(101, 0.01, 100)
    now_us = int(h.clock.seconds() * 1e6)
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": str(now_us), "bids": [list(b) for b in bids], "asks": [list(a) for a in asks]})
    before = mismatches()
    for level, amount in ((50, "1"), (50, "2")):  # the same book, then a deep level changed
        h.clock.advance(h.feed.adapter.verify_interval + 5)
        h.connection.activity()
        changed = [list(b) for b in bids]
        changed[level][1] = amount
        h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
            "microtimestamp": str(int(h.clock.seconds() * 1e6)), "bids": changed,
            "asks": [list(a) for a in asks]})
    assert mismatches() == before + 1
    assert h.books["ethbtc"].state is BookState.LIVE


# -- order_book_ frames read only as far as the served levels (BookFrame) ---------------


def frame_levels(start, step, count):
    # As Bitstamp sends them: amounts with 8 decimals.
    return levels(start, step, count, amount="1.00000000")


def _state_after(frame):
    h = Harness()
    h.receive(book_message("ethbtc", 2000, frame_levels(99, -0.01, 100), frame_levels(102, 0.01, 100)))
    h.receive(frame)
    book = h.books["ethbtc"]
    return book.state, book.book.top_bids(10), book.book.top_asks(10), book.book.depth(), h


def _with(index, level, count=100):
    bids = frame_levels(100, -0.01, count)
    bids[index] = level
    return bids


FRAME_CASES = {
    "whole top 100": frame_levels(100, -0.01, 100),
    "fewer levels than served": frame_levels(100, -0.01, 5),
    "an empty side": [],
    "exactly the served levels and one": frame_levels(100, -0.01, 11),
    "whole numbers": [(str(43000 - i), "1") for i in range(100)],
    "nan served": _with(3, ("nan", "1")),
    "nan as the level beyond the served": _with(10, ("nan", "1")),
    "negative amount": _with(0, ("100.00", "-1")),
    "inf amount": _with(9, ("99.91", "inf")),
    "not a number": _with(2, ("x", "1")),
    "a level of one": _with(4, ("99.96",)),
    "a level of three": _with(4, ("99.96", "1", "2")),
    "a bracket inside a string": _with(1, ("99.99]", "1")),
    "a leading zero": _with(0, ("0100.00", "1")),
    "no fraction": _with(0, ("100", "1")),
    "an exponent": _with(0, ("1.0e2", "1")),
    "out of order": _with(0, ("99.50", "1")),
    "a zero amount served": _with(2, ("99.98", "0.00000000")),
    "a bad level deeper than served": _with(60, ("nan", "1")),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_a_frame_read_to_its_served_levels_gives_what_decoding_it_whole_gives(case):
    # The compact frame goes through BookFrame; the same frame indented (a
    # shape BookFrame does not read) is decoded whole as before.
    bids, asks = FRAME_CASES[case], frame_levels(101, 0.01, 100)
    compact = book_message("ethbtc", 3000, bids, asks)
    indented = orjson.dumps(orjson.loads(compact), option=orjson.OPT_INDENT_2)
    assert isinstance(BitstampAdapter.decode(None, compact)["data"], BookFrame)
    assert isinstance(BitstampAdapter.decode(None, indented)["data"], dict)
    read, whole = _state_after(compact), _state_after(indented)
    assert read[:4] == whole[:4]
    for side in read[1:3]:
        assert all(type(number) is float for level in side for number in level)


def test_a_frame_with_json_numbers_is_decoded_whole():
    frame = orjson.dumps({"data": {"timestamp": "0", "microtimestamp": "3000",
                                   "bids": [[100.0, 2.5]], "asks": [[101.0, 1.0]]},
                          "channel": "order_book_ethbtc", "event": "data"})
    state, bids, asks, _, _ = _state_after(frame)
    assert (state, bids, asks) == (BookState.LIVE, [(100.0, 2.5)], [(101.0, 1.0)])


def test_a_frame_malformed_beyond_its_served_levels_serves_them_until_the_verification():
    h, now_us = seeded()
    frame = book_message("ethbtc", now_us, frame_levels(100, -0.01, 100),
                         frame_levels(101, 0.01, 100))
    cut = frame.index(b'["99.40"')  # the 61st bid
    frame = frame[:cut] + b"oops," + frame[cut:]  # not JSON any more
    h.receive(frame)
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(1) == [(100.0, 1.0)]
    verify_against_a_newer_snapshot(h, now_us)
    assert h.books["ethbtc"].state is BookState.STALE


def test_a_frame_of_another_shape_is_decoded_whole():
    # Keys in another order: not read by BookFrame, still a book.
    frame = orjson.dumps({"event": "data", "channel": "order_book_ethbtc",
                          "data": {"microtimestamp": "3000", "timestamp": "0",
                                   "bids": [["100.00", "2"]], "asks": [["101.00", "1"]]}})
    assert isinstance(BitstampAdapter.decode(None, frame)["data"], dict)
    state, bids, _, _, _ = _state_after(frame)
    assert (state, bids) == (BookState.LIVE, [(100.0, 2.0)])


@pytest.mark.parametrize("bids", [frame_levels(100, -0.01, 100), [(str(43000 - i), "0.5") for i in range(3)], []])
def test_a_book_frame_reads_the_served_levels_from_its_text(bids):
    asks = frame_levels(101, 0.01, 100)
    channel, frame = BookFrame.read(book_message("ethbtc", 3000, bids, asks))
    assert (channel, frame.microtimestamp) == ("order_book_ethbtc", 3000)
    served = frame.served(11)
    assert served is not None, "read from the text, not decoded whole"
    top_bids, top_asks = frame.top_levels(served)
    assert [tuple(level) for level in top_bids] == [(float(p), float(a)) for p, a in bids[:11]]
    assert [tuple(level) for level in top_asks] == [(float(p), float(a)) for p, a in asks[:11]]


@pytest.mark.parametrize("level", [("nan", "1"), ("1.0e2", "1"), ("99.99]", "1"), ("99.99",)])
def test_a_book_frame_does_not_vouch_for_levels_outside_the_grammar(level):
    _, frame = BookFrame.read(book_message("ethbtc", 3000, _with(5, level), []))
    assert frame.served(11) is None
    assert frame.served(5) is not None  # the levels before it are fine
