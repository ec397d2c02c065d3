import orjson
import pytest

from aggregator.book import BookState
from aggregator.exchanges.binance import BinanceAdapter, SyncState
from aggregator.book import ExchangeBook
from prometheus_client import REGISTRY

from tests import recorded
from tests.fakes import FakeProtocol, FeedHarness

REST = "http://rest.test"


def diff(symbol, first, last, bids=(), asks=()):
    return orjson.dumps({"stream": f"{symbol}@depth@100ms", "data": {
        "e": "depthUpdate", "E": 1, "s": symbol.upper(), "U": first, "u": last,
        "b": [list(level) for level in bids], "a": [list(level) for level in asks]}})


def snapshot(last_update_id, bids=(), asks=()):
    return {"lastUpdateId": last_update_id, "bids": [list(b) for b in bids],
            "asks": [list(a) for a in asks]}


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Harness(FeedHarness):
    def __init__(self, symbols=("ethbtc",), listed=()):
        super().__init__(BinanceAdapter, symbols, listed=listed)

    def ack_all(self):
        for frame in self.protocol.frames():
            if frame.get("method") == "SUBSCRIBE":
                self.receive(orjson.dumps({"result": None, "id": frame["id"]}))

    def live(self, symbol="ethbtc", last_update_id=100, bids=(("1.0", "1.0"),), asks=(("2.0", "1.0"),)):
        self.ack_all()
        self.http.answer(f"{REST}/api/v3/depth?symbol={symbol.upper()}", snapshot(last_update_id, bids, asks))
        assert self.books[symbol].state is BookState.LIVE


def test_subscribes_then_fetches_snapshot_after_ack():
    h = Harness(["ethbtc", "btcusdt"])
    assert h.protocol.frames() == [{"method": "SUBSCRIBE", "params": [
        "btcusdt@depth@100ms", "ethbtc@depth@100ms"], "id": 1}]
    assert h.http.pending(f"{REST}/api/v3/depth") == []
    h.ack_all()
    assert [url for url, _ in h.http.pending(f"{REST}/api/v3/depth")] == [
        f"{REST}/api/v3/depth?symbol=BTCUSDT&limit=100",
        f"{REST}/api/v3/depth?symbol=ETHBTC&limit=100"]
    assert h.books["ethbtc"].state is BookState.SYNCING


def test_buffered_diffs_are_bridged_by_update_id():
    h = Harness()
    h.ack_all()
    h.receive(diff("ethbtc", 95, 99, bids=[("1.5", "9")]))   # in snapshot
    h.receive(diff("ethbtc", 100, 102, bids=[("1.1", "3")]))  # bridges L+1=101
    h.receive(diff("ethbtc", 103, 103, asks=[("2.0", "0")]))
    h.http.answer(f"{REST}/api/v3/depth", snapshot(100, [("1.0", "1.0")], [("2.0", "1.0"), ("2.5", "4")]))
    book = h.books["ethbtc"].book
    assert book.top_bids(10) == [(1.1, 3.0), (1.0, 1.0)]
    assert book.top_asks(10) == [(2.5, 4.0)]
    assert h.feed.adapter.syncs["ethbtc"].last_update_id == 103


def test_diff_older_than_snapshot_arriving_after_it_is_dropped_by_id():
    h = Harness()
    h.live(last_update_id=100)
    h.receive(diff("ethbtc", 97, 100, bids=[("1.0", "0")]))  # already in snapshot
    assert h.books["ethbtc"].book.top_bids(10) == [(1.0, 1.0)]
    h.receive(diff("ethbtc", 99, 101, bids=[("1.0", "5")]))  # straddles L+1
    assert h.books["ethbtc"].book.top_bids(10) == [(1.0, 5.0)]


def test_gap_marks_stale_and_resyncs_that_symbol_only():
    h = Harness(["ethbtc", "btcusdt"])
    h.live("ethbtc", 100)
    h.live("btcusdt", 500)
    h.receive(diff("ethbtc", 101, 101, bids=[("1.2", "1")]))
    h.receive(diff("ethbtc", 105, 106, bids=[("1.3", "1")]))  # 102-104 missing
    assert h.books["ethbtc"].state is BookState.STALE
    assert "gap" in h.books["ethbtc"].reason
    assert h.books["ethbtc"].book.top_bids(10) == []  # withheld, not served
    assert h.books["btcusdt"].state is BookState.LIVE
    h.clock.advance(0)
    h.receive(diff("ethbtc", 107, 108, bids=[("1.4", "2")]))  # buffered meanwhile
    h.http.answer(f"{REST}/api/v3/depth?symbol=ETHBTC", snapshot(106, [("1.3", "1")], [("2.0", "1")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(10) == [(1.4, 2.0), (1.3, 1.0)]


def test_snapshot_older_than_the_stream_is_fetched_again():
    h = Harness()
    h.ack_all()
    h.receive(diff("ethbtc", 120, 121))
    h.http.answer(f"{REST}/api/v3/depth", snapshot(100))
    assert h.books["ethbtc"].state is not BookState.LIVE
    h.clock.advance(0)
    assert len(h.http.pending(f"{REST}/api/v3/depth")) == 1
    h.receive(diff("ethbtc", 122, 122, bids=[("1.0", "2")]))
    h.http.answer(f"{REST}/api/v3/depth", snapshot(121, [("1.0", "1")], []))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(10) == [(1.0, 2.0)]


@pytest.mark.parametrize("level", [("NaN", "1"), ("1", "inf"), ("-1", "1"), ("1", "-2"),
                                    ("abc", "1"), ("0", "1"), (None, "1"), ("1",)])
def test_bad_numbers_reject_the_update_and_resync(level):
    h = Harness()
    h.live(last_update_id=100)
    h.receive(orjson.dumps({"stream": "ethbtc@depth@100ms", "data": {
        "e": "depthUpdate", "U": 101, "u": 101, "b": [["1.5", "1"], list(level)], "a": []}}))
    book = h.books["ethbtc"]
    assert book.state is BookState.STALE and "rejected update" in book.reason
    assert book.book.top_bids(10) == []
    h.clock.advance(0)
    assert len(h.http.pending(f"{REST}/api/v3/depth")) == 1


@pytest.mark.parametrize("ids", [{"U": "101", "u": 101}, {"u": 101}, {"U": 102, "u": 101}])
def test_malformed_update_ids_resync(ids):
    h = Harness()
    h.live(last_update_id=100)
    h.receive(orjson.dumps({"stream": "ethbtc@depth@100ms", "data": {
        "e": "depthUpdate", **ids, "b": [], "a": []}}))
    assert h.books["ethbtc"].state is BookState.STALE


def test_snapshot_older_than_what_the_book_showed_is_fetched_again():
    h = Harness()
    h.live(last_update_id=100)
    h.receive(diff("ethbtc", 101, 110, bids=[("1.5", "1")]))
    h.receive(orjson.dumps({"stream": "ethbtc@depth@100ms", "data": {
        "e": "depthUpdate", "U": 111, "u": 111, "b": [["nan", "1"]], "a": []}}))
    h.clock.advance(0)
    h.http.answer(f"{REST}/api/v3/depth", snapshot(105, [("1.0", "1")], []))  # stale (cached?)
    assert h.books["ethbtc"].state is BookState.STALE
    h.clock.advance(60)
    h.http.answer(f"{REST}/api/v3/depth", snapshot(111, [("1.6", "1")], []))
    assert h.books["ethbtc"].state is BookState.LIVE


def test_the_diff_that_revealed_a_gap_is_bridged_by_the_next_snapshot():
    h = Harness()
    h.live(last_update_id=100)
    h.receive(diff("ethbtc", 105, 106, bids=[("1.7", "1")]))
    h.clock.advance(0)
    h.http.answer(f"{REST}/api/v3/depth", snapshot(103, [("1.0", "1")], []))  # before 105: refetch
    assert h.books["ethbtc"].state is BookState.STALE
    h.clock.advance(60)
    h.http.answer(f"{REST}/api/v3/depth", snapshot(104, [("1.0", "1")], []))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(1) == [(1.7, 1.0)]


def test_bad_snapshot_is_fetched_again():
    h = Harness()
    h.ack_all()
    h.http.answer(f"{REST}/api/v3/depth", {"lastUpdateId": 5, "bids": [["nan", "1"]], "asks": []})
    assert h.books["ethbtc"].state is BookState.STALE
    h.clock.advance(0)
    h.http.answer(f"{REST}/api/v3/depth", {"unexpected": True})
    h.clock.advance(60)
    h.http.fail(f"{REST}/api/v3/depth", RuntimeError("HTTP 500"))
    h.clock.advance(60)
    h.http.answer(f"{REST}/api/v3/depth", snapshot(5, [("1", "1")]))
    assert h.books["ethbtc"].state is BookState.LIVE


def test_a_cut_snapshot_thinning_out_below_the_served_depth_resyncs():
    h = Harness()
    h.ack_all()
    bids = [(f"{100 - i}", "1") for i in range(100)]  # exactly the limit: cut
    h.http.answer(f"{REST}/api/v3/depth", snapshot(10, bids, [("101", "1")]))
    book = h.books["ethbtc"]
    assert book.state is BookState.LIVE
    deleted = [(f"{100 - i}", "0") for i in range(90)]  # 10 known bids left: still exact
    h.receive(diff("ethbtc", 11, 11, bids=deleted))
    assert book.state is BookState.LIVE
    h.receive(diff("ethbtc", 12, 12, bids=[("10", "0")]))  # 9 known: level 10 may be unknown
    assert book.state is BookState.STALE and "thinned out" in book.reason


def test_a_thin_but_complete_book_is_fine():
    h = Harness()
    h.live(bids=[("1", "1")], asks=[("2", "1")])
    h.receive(diff("ethbtc", 101, 101, bids=[("1", "0")]))
    assert h.books["ethbtc"].state is BookState.LIVE


def test_malformed_json_and_unknown_messages_do_not_break_the_feed():
    h = Harness()
    h.live(last_update_id=100)
    h.receive(b"{not json")
    h.receive(b"[1, 2]")
    h.receive(orjson.dumps({"stream": "ethbtc@trade", "data": {"e": "trade"}}))
    h.receive(diff("ethbtc", 101, 101, bids=[("1.5", "1")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(1) == [(1.5, 1.0)]


def test_error_reply_is_retried_with_backoff_until_accepted():
    """Defect 8d: a refused SUBSCRIBE used to leave the book stale for good."""
    h = Harness()
    h.feed.retry_policy = lambda attempt: 2.0 * (attempt + 1)
    retries = metric("aggregator_subscribe_retries_total", exchange="binance", reason="refused")
    h.receive(orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": 1}))
    book = h.books["ethbtc"]
    assert book.state is BookState.SYNCING and "refused" in book.reason
    assert metric("aggregator_subscribe_retries_total", exchange="binance", reason="refused") == retries + 1
    h.clock.advance(1.9)
    assert len(h.protocol.frames()) == 1  # not before the backoff
    h.clock.advance(0.2)
    assert h.protocol.frames()[-1] == {"method": "SUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 2}
    h.receive(orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": 2}))
    h.clock.advance(3.9)
    assert len(h.protocol.frames()) == 2  # the backoff grows
    h.clock.advance(0.2)
    assert h.protocol.frames()[-1]["id"] == 3
    h.receive(orjson.dumps({"result": None, "id": 3}))
    h.http.answer(f"{REST}/api/v3/depth", snapshot(10, [("1", "1")], [("2", "1")]))
    assert book.state is BookState.LIVE


def test_unanswered_subscribe_is_timed_out_and_sent_again():
    """Defect 8j: a SUBSCRIBE reply that never came was waited for forever."""
    h = Harness()
    timeouts = metric("aggregator_subscribe_retries_total", exchange="binance", reason="timeout")
    h.clock.advance(h.feed.settings.reply_timeout - 0.1)
    assert len(h.protocol.frames()) == 1
    h.clock.advance(0.2)
    h.clock.advance(1)
    assert h.protocol.frames()[-1] == {"method": "SUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 2}
    assert metric("aggregator_subscribe_retries_total", exchange="binance", reason="timeout") == timeouts + 1
    h.receive(orjson.dumps({"result": None, "id": 2}))
    assert h.http.pending(f"{REST}/api/v3/depth")
    h.clock.advance(60)
    assert len(h.protocol.frames()) == 2  # answered: no more retries


def test_unwatch_sends_unsubscribe_and_cancels_the_snapshot():
    h = Harness()
    h.ack_all()
    (_, request), = h.http.pending(f"{REST}/api/v3/depth")
    h.feed.unwatch("ethbtc")
    assert request.called  # cancelled
    h.clock.advance(0)
    h.clock.advance(1)
    assert h.protocol.frames()[-1] == {"method": "UNSUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 2}
    h.receive(diff("ethbtc", 1, 2))  # late data for it is ignored
    # No retry scheduled for a forgotten symbol.
    assert not any("DepthSync" in repr(call.func) for call in h.clock.getDelayedCalls())
    assert h.books["ethbtc"].state is BookState.SYNCING


def test_symbols_watched_in_one_turn_share_one_subscribe_frame():
    h = Harness([], listed=[f"sym{i}" for i in range(150)])
    for i in range(150):
        h.feed.watch(ExchangeBook("binance", f"sym{i}", h.changes.append))
    h.feed.unwatch("sym149")  # never subscribed: nothing to send for it
    h.clock.advance(0)
    h.clock.advance(1)
    frames = h.protocol.frames()
    assert [len(f["params"]) for f in frames] == [100, 49]
    assert all(f["method"] == "SUBSCRIBE" for f in frames)


def test_outbound_frames_are_paced_under_binance_budget():
    h = Harness([])
    for i in range(20):
        h.connection.send({"id": i})
    sent_at = []
    for _ in range(200):
        sent_at.extend([h.clock.seconds()] * (len(h.protocol.sent) - len(sent_at)))
        h.clock.advance(0.05)
    assert len(sent_at) == 20
    for i in range(len(sent_at) - 4):
        assert sent_at[i + 4] - sent_at[i] >= 1.0 - 1e-9  # never 5 within a second


def test_disconnect_marks_everything_stale_and_reconnect_resubscribes():
    h = Harness()
    h.live(last_update_id=100)
    h.connection.connection_closed(h.protocol, "code=1006")
    assert h.books["ethbtc"].state is BookState.STALE
    assert h.feed.adapter.syncs == {}
    protocol = FakeProtocol()
    h.connection.connection_opened(protocol)
    h.clock.advance(0)
    assert protocol.frames()[0]["params"] == ["ethbtc@depth@100ms"]
    assert h.books["ethbtc"].state is BookState.SYNCING
    h.protocol = protocol
    h.live(last_update_id=300)


def test_recorded_traffic_reproduces_binance_book_ticker():
    """PROTOCOLS §3.4: snapshot + diffs reproduce every bookTicker whose u
    equals a diff's u, exactly."""
    symbols = ["nknusdt", "blzeth", "lrcbtc", "runeeur"]
    h = Harness(symbols)
    h.ack_all()
    checked = 0
    tickers = {}  # (symbol, u) -> bookTicker; it arrives ahead of the 100 ms diff
    for line in recorded.merged("BINANCE"):
        if line.kind == "http":
            symbol = line.url.split("symbol=")[1].split("&")[0]
            h.http.answer(f"{REST}/api/v3/depth?symbol={symbol}", orjson.loads(line.payload))
            continue
        if line.kind != "recv":
            continue
        h.receive(line.payload.encode())
        message = orjson.loads(line.payload)
        symbol = message["stream"].partition("@")[0]
        if message["stream"].endswith("@bookTicker"):
            tickers[symbol, message["data"]["u"]] = message["data"]
            continue
        sync = h.feed.adapter.syncs[symbol]
        ticker = tickers.pop((symbol, sync.last_update_id), None)
        if sync.state is SyncState.LIVE and ticker is not None:
            book = h.books[symbol].book
            assert book.top_bids(1) == [(float(ticker["b"]), float(ticker["B"]))]
            assert book.top_asks(1) == [(float(ticker["a"]), float(ticker["A"]))]
            checked += 1
    assert checked == 26  # NKNUSDT 19, LRCBTC 6, BLZETH 1
    assert all(book.state is BookState.LIVE for book in h.books.values())
    assert not any(book.book.is_crossed() for book in h.books.values())


def test_invalid_utf8_is_rejected_by_the_decoder_not_trusted():
    """Autobahn's UTF-8 check is off (aggregator/exchanges/websocket.py): orjson's must hold."""
    h = Harness()
    h.live(last_update_id=100)
    rejects = metric("aggregator_rejects_total", exchange="binance", reason="malformed_json")
    good = diff("ethbtc", 101, 101, bids=[("1.5", "1")])
    for bad in (b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"):  # invalid byte, surrogate, overlong
        h.receive(good.replace(b'"1.5"', b'"1.5' + bad + b'"'))
    assert metric("aggregator_rejects_total", exchange="binance", reason="malformed_json") == rejects + 3
    assert h.books["ethbtc"].book.top_bids(1) != [(1.5, 1.0)]
    h.receive(good)
    assert h.books["ethbtc"].book.top_bids(1) == [(1.5, 1.0)]
