"""The venue contract, one test per defect it closed (issue 8, item 4): a book
update is a transaction, subscriptions are retried and acknowledged by either
connection of a handover, demand coalesces, every buffer and waiter is bounded.

No sockets: feeds on a Clock with a fake connector, opened by hand.
"""

import dataclasses

import orjson
import pytest
from prometheus_client import REGISTRY

from aggregator.book import BookState, ExchangeBook
from aggregator.exchanges.binance import BinanceAdapter, SyncState, snapshot_tier
from aggregator.exchanges.bitstamp import MAX_FUTURE_US, BitstampAdapter
from tests.fakes import FakeProtocol, FeedHarness

REST = "http://rest.test"
NOW = 1_700_000_000.0


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def binance_diff(symbol, first, last, bids=(), asks=()):
    return orjson.dumps({"stream": f"{symbol}@depth@100ms", "data": {
        "e": "depthUpdate", "E": 1, "s": symbol.upper(), "U": first, "u": last,
        "b": [list(level) for level in bids], "a": [list(level) for level in asks]}})


def bitstamp_book(pair, micros, bids=(("0.05", "1"),), asks=(("0.06", "1"),)):
    return orjson.dumps({"data": {"microtimestamp": str(micros), "bids": [list(b) for b in bids],
                                  "asks": [list(a) for a in asks]},
                         "channel": f"order_book_{pair}", "event": "data"})


class Watching(FeedHarness):
    """A harness whose listener records what a client could have seen:
    (state, top bid, top ask, crossed) at every notification."""

    def _changed(self, book, arrival):
        super()._changed(book, arrival)
        self.seen = getattr(self, "seen", [])
        self.seen.append((book.state, book.book.top_bids(1), book.book.top_asks(1),
                          book.book.is_crossed(), len(book.book)))


EXTRA = ["ethbtc", "btcusdt", "btcusd"]


def binance(symbols=("ethbtc",), depth=None):
    h = Watching(BinanceAdapter, symbols, start_time=NOW, listed=EXTRA)
    if depth is not None:
        for book in h.books.values():
            book.depth = depth
    return h


def ack_binance(h, protocol=None, connection=None):
    protocol = protocol or h.protocol
    connection = connection or h.connection
    for frame in protocol.frames():
        if frame.get("method") == "SUBSCRIBE":
            connection.message_received(orjson.dumps({"result": None, "id": frame["id"]}))


def live_binance(h, symbol="ethbtc", last=100, bids=(("1.0", "1.0"),), asks=(("2.0", "1.0"),)):
    ack_binance(h)
    h.http.answer(f"{REST}/api/v3/depth?symbol={symbol.upper()}",
                  {"lastUpdateId": last, "bids": [list(b) for b in bids], "asks": [list(a) for a in asks]})
    assert h.books[symbol].state is BookState.LIVE


# -- a. validate, then publish ------------------------------------------------------


def test_a_crossed_binance_book_is_withdrawn_without_ever_being_published():
    h = binance()
    live_binance(h)
    h.seen = []
    h.receive(binance_diff("ethbtc", 101, 101, bids=[("2.5", "1")]))  # crosses the 2.0 ask
    assert h.books["ethbtc"].state is BookState.STALE
    # The only notification is the withdrawal: no client saw the crossed book live.
    assert [(state, crossed) for state, _, _, crossed, _ in h.seen] == [(BookState.STALE, False)]


def test_a_thinned_binance_book_is_withdrawn_without_ever_being_published():
    h = binance(depth=2)
    limit, _ = snapshot_tier(2)
    bids = [(f"{1.0 - i * 0.01:.2f}", "1") for i in range(limit)]  # a full, cut side
    live_binance(h, bids=bids, asks=[("2.0", "1")])
    h.seen = []
    deletes = [(price, "0") for price, _ in bids[: limit - 1]]
    h.receive(binance_diff("ethbtc", 101, 101, bids=deletes))  # 1 level left inside the horizon
    assert h.books["ethbtc"].state is BookState.STALE
    assert [state for state, *_ in h.seen] == [BookState.STALE]


def test_a_diff_commits_with_its_frames_arrival_and_a_snapshot_with_none():
    h = binance()
    live_binance(h)
    assert h.arrivals[-1] is None  # made live by a REST answer: no latency sample
    h.clock.advance(0.25)
    h.receive(binance_diff("ethbtc", 101, 101, bids=[("1.5", "1")]))
    assert h.arrivals[-1] == NOW + 0.25


# -- b. Bitstamp timestamps from the future ----------------------------------------------


def test_b_bitstamp_message_from_the_future_is_rejected_and_the_book_resyncs():
    h = Watching(BitstampAdapter, ["ethbtc"], start_time=NOW, listed=EXTRA)
    now_us = int(NOW * 1e6)
    h.receive(bitstamp_book("ethbtc", now_us - 1000))
    assert h.books["ethbtc"].state is BookState.LIVE
    rejects = metric("aggregator_rejects_total", exchange="bitstamp", reason="bad_timestamp")
    h.receive(bitstamp_book("ethbtc", now_us + 3600 * 10**6, bids=[("0.04", "9")]))
    assert h.books["ethbtc"].state is BookState.STALE
    assert metric("aggregator_rejects_total", exchange="bitstamp", reason="bad_timestamp") == rejects + 1
    assert h.http.pending(f"{REST}/api/v2/order_book/ethbtc/")  # resync: a fresh snapshot
    # Later, true messages are not "older" than the rejected one: the book moves on.
    h.receive(bitstamp_book("ethbtc", now_us + 1000, bids=[("0.051", "2")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert h.books["ethbtc"].book.top_bids(1) == [(0.051, 2.0)]


def test_b_periodic_verification_catches_a_book_frozen_ahead_of_the_exchange():
    h = Watching(BitstampAdapter, ["ethbtc"], start_time=NOW, listed=EXTRA)
    now_us = int(NOW * 1e6)
    h.receive(bitstamp_book("ethbtc", now_us))
    sync = h.feed.adapter.syncs["ethbtc"]
    # As a frozen book looks: held levels stamped far ahead (a clock step back).
    sync.held_time = now_us + 2 * MAX_FUTURE_US
    h.clock.advance(h.feed.adapter.verify_interval + 5)
    h.connection.activity()
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": str(now_us + 10**6), "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})
    assert h.books["ethbtc"].state is BookState.STALE
    h.http.answer(f"{REST}/api/v2/order_book/ethbtc/", {
        "microtimestamp": str(now_us + 2 * 10**6), "bids": [["0.05", "1"]], "asks": [["0.06", "1"]]})
    assert h.books["ethbtc"].state is BookState.LIVE


# -- c. a symbol subscribed during a handover ------------------------------------------


def rotate_and_open_successor(h):
    h.feed.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    protocol = FakeProtocol()
    successor.connection_opened(protocol)
    h.clock.advance(0)
    return successor, protocol


def test_c_binance_symbol_subscribed_mid_handover_syncs_when_the_successor_acks_first():
    h = binance()
    live_binance(h)
    successor, new_protocol = rotate_and_open_successor(h)
    book = ExchangeBook("binance", "btcusdt", h._changed)
    h.books["btcusdt"] = book
    h.feed.watch(book)
    h.clock.advance(1)  # both connections send their SUBSCRIBE
    old_request = [f for f in h.protocol.frames() if "btcusdt@depth@100ms" in f["params"]]
    new_request = [f for f in new_protocol.frames() if "btcusdt@depth@100ms" in f["params"]]
    assert old_request and new_request
    successor.message_received(orjson.dumps({"result": None, "id": new_request[0]["id"]}))
    h.clock.advance(h.feed.settings.handover_overlap)  # handover; the old ack never comes
    assert h.feed.connections == [successor]
    assert h.http.pending(f"{REST}/api/v3/depth?symbol=BTCUSDT")
    h.http.answer(f"{REST}/api/v3/depth?symbol=BTCUSDT",
                  {"lastUpdateId": 7, "bids": [["1", "1"]], "asks": [["2", "1"]]})
    assert book.state is BookState.LIVE


def test_c_bitstamp_symbol_subscribed_mid_handover_is_seeded_when_the_successor_acks_first():
    h = Watching(BitstampAdapter, ["ethbtc"], start_time=NOW, listed=EXTRA)
    h.receive(bitstamp_book("ethbtc", int(NOW * 1e6)))
    successor, new_protocol = rotate_and_open_successor(h)
    book = ExchangeBook("bitstamp", "btcusd", h._changed)
    h.feed.watch(book)
    h.clock.advance(1)
    successor.message_received(orjson.dumps(
        {"event": "bts:subscription_succeeded", "channel": "order_book_btcusd", "data": {}}))
    h.clock.advance(h.feed.settings.handover_overlap)
    assert h.feed.connections == [successor]
    h.http.answer(f"{REST}/api/v2/order_book/btcusd/", {
        "microtimestamp": str(int(NOW * 1e6)), "bids": [["10", "1"]], "asks": [["11", "1"]]})
    assert book.state is BookState.LIVE


# -- d. subscription errors ------------------------------------------------------------


def test_d_binance_error_on_the_successor_keeps_the_healthy_book_live():
    h = binance()
    live_binance(h)
    successor, new_protocol = rotate_and_open_successor(h)
    (request,) = new_protocol.frames()
    successor.message_received(orjson.dumps({"error": {"code": 2, "msg": "busy"}, "id": request["id"]}))
    assert h.books["ethbtc"].state is BookState.LIVE
    h.clock.advance(5)  # retried on the successor only
    assert [f["method"] for f in new_protocol.frames()] == ["SUBSCRIBE", "SUBSCRIBE"]
    assert [f["method"] for f in h.protocol.frames()] == ["SUBSCRIBE"]
    ack_binance(h, new_protocol, successor)
    h.clock.advance(h.feed.settings.handover_overlap)
    assert h.feed.connections == [successor]
    assert h.books["ethbtc"].state is BookState.LIVE


def test_d_bitstamp_error_is_retried_and_a_successors_error_keeps_the_book_live():
    h = Watching(BitstampAdapter, ["ethbtc"], start_time=NOW, listed=EXTRA)
    h.feed.retry_policy = lambda attempt: 1.0
    h.clock.advance(0.1)
    h.receive(orjson.dumps({"event": "bts:error", "channel": "",
                            "data": {"code": None, "message": "Bad subscription string."}}))
    assert h.books["ethbtc"].state is BookState.SYNCING and "refused" in h.books["ethbtc"].reason
    h.clock.advance(1.1)
    assert [f["event"] for f in h.protocol.frames()] == ["bts:subscribe", "bts:subscribe"]
    h.receive(bitstamp_book("ethbtc", int(NOW * 1e6)))
    successor, new_protocol = rotate_and_open_successor(h)
    successor.message_received(orjson.dumps({"event": "bts:error", "channel": "", "data": {}}))
    assert h.books["ethbtc"].state is BookState.LIVE


# -- e. --depth beyond the snapshot -----------------------------------------------------


@pytest.mark.parametrize("depth,limit,weight", [(10, 100, 5), (20, 100, 5), (100, 500, 25),
                                                (200, 1000, 50), (1000, 5000, 250)])
def test_e_binance_snapshot_limit_follows_the_depth(depth, limit, weight):
    h = binance(depth=depth)
    h.feed.adapter.stop_sync("ethbtc")  # the sync was made before the depth changed
    h.feed.restart_sync(h.connection, "ethbtc")
    (url, _), = h.http.pending(f"{REST}/api/v3/depth")
    assert url.endswith(f"&limit={limit}")
    assert (url, weight) in h.http.weights


def test_e_depth_100_book_survives_a_deletion_instead_of_flapping():
    h = binance(depth=100)
    limit, _ = snapshot_tier(100)
    bids = [(f"{100 - i * 0.01:.2f}", "1") for i in range(limit)]
    live_binance(h, bids=bids, asks=[("200", "1")])
    h.receive(binance_diff("ethbtc", 101, 101, bids=[(bids[0][0], "0")]))
    assert h.books["ethbtc"].state is BookState.LIVE
    assert len(h.http.pending(f"{REST}/api/v3/depth")) == 0


# -- f. demand flapping ----------------------------------------------------------------------


def test_f_streams_opened_and_cancelled_in_alternate_turns_never_queue_frames():
    h = binance([])
    for _ in range(2000):
        book = ExchangeBook("binance", "btcusdt", h._changed)
        h.feed.watch(book)
        h.clock.advance(0)
        h.feed.unwatch("btcusdt")
        h.clock.advance(0.05)
    # At most one change pending per stream; frames left at the paced rate only
    # when the wanted state differed from the sent one.
    assert not h.connection._outbox
    assert len(h.protocol.frames()) <= 2 * 2000 * 0.05 * 3 + 2
    book = ExchangeBook("binance", "btcusdt", h._changed)
    h.feed.watch(book)
    h.clock.advance(1)
    ack_binance(h)
    h.http.answer(f"{REST}/api/v3/depth?symbol=BTCUSDT",
                  {"lastUpdateId": 9, "bids": [["1", "1"]], "asks": [["2", "1"]]})
    assert book.state is BookState.LIVE


def test_f_a_stream_cancelled_and_reopened_before_its_frame_left_sends_nothing():
    h = binance(["ethbtc"])
    live_binance(h)
    sent = len(h.protocol.frames())
    h.feed.unwatch("ethbtc")
    book = ExchangeBook("binance", "ethbtc", h._changed)
    h.feed.watch(book)
    h.clock.advance(1)
    assert len(h.protocol.frames()) == sent  # neither UNSUBSCRIBE nor SUBSCRIBE
    h.http.answer(f"{REST}/api/v3/depth?symbol=ETHBTC",
                  {"lastUpdateId": 200, "bids": [["1", "1"]], "asks": [["2", "1"]]})
    assert book.state is BookState.LIVE


# -- g. waiters while a symbol list cannot load ------------------------------------------------


def test_g_cancelled_symbol_list_waiters_are_forgotten():
    from twisted.internet.task import Clock

    from aggregator.exchanges.feed import VenueFeed
    from tests.fakes import FakeConnector, FakeHttp

    feed = VenueFeed(BinanceAdapter, "ws://ws.test", REST, reactor=Clock(), http=FakeHttp(),
                     connector=FakeConnector())
    feed.startService()  # the symbol list never answers
    for _ in range(20_000):
        feed.when_symbols_loaded().cancel()
    assert feed.listed_symbols() is None
    assert feed.symbol_list.waiting == 0
    waiter = feed.when_symbols_loaded()
    assert feed.symbol_list.waiting == 1 and not waiter.called
    feed.stopService()


# -- h. wrong types where levels belong ----------------------------------------------------


@pytest.mark.parametrize("bids", [["12", "34"], [["1_000", "1"]], "1234", [["1", "2", "3"]]])
def test_h_a_binance_diff_with_wrongly_typed_levels_is_rejected(bids):
    h = binance()
    live_binance(h)
    rejects = metric("aggregator_rejects_total", exchange="binance", reason="bad_number")
    h.receive(orjson.dumps({"stream": "ethbtc@depth@100ms", "data": {
        "e": "depthUpdate", "U": 101, "u": 101, "b": bids, "a": []}}))
    assert h.books["ethbtc"].state is BookState.STALE
    assert metric("aggregator_rejects_total", exchange="binance", reason="bad_number") == rejects + 1


# -- i. exchangeInfo's weight -----------------------------------------------------------------


def test_i_exchange_info_is_charged_its_weight():
    h = binance()
    assert (f"{REST}/api/v3/exchangeInfo", 20.0) in h.http.weights


# -- k. one buffering budget -------------------------------------------------------------------


def test_k_diffs_buffered_across_symbols_are_bounded_and_overflow_resyncs():
    symbols = [f"s{i}" for i in range(4)]
    h = binance(symbols)
    h.feed.adapter.budget.limit = 10
    overflows = metric("aggregator_buffer_overflows_total", exchange="binance")
    ack_binance(h)  # every symbol fetching its snapshot, buffering meanwhile
    for n in range(1, 9):
        for symbol in symbols:
            h.receive(binance_diff(symbol, n, n, bids=[("1.0", str(n))]))
        assert h.feed.adapter.budget.used <= 10
    assert metric("aggregator_buffer_overflows_total", exchange="binance") > overflows
    # Snapshots older than what was dropped are refused (a gap), newer ones bridge.
    for symbol in symbols:
        h.http.answer(f"{REST}/api/v3/depth?symbol={symbol.upper()}",
                      {"lastUpdateId": 3, "bids": [["1.0", "3"]], "asks": [["2", "1"]]})
    for symbol in symbols:
        book = h.books[symbol]
        if book.state is not BookState.LIVE:
            assert h.feed.adapter.syncs[symbol].state is SyncState.FETCHING
            h.clock.advance(0)
            h.http.answer(f"{REST}/api/v3/depth?symbol={symbol.upper()}",
                          {"lastUpdateId": 8, "bids": [["1.0", "8"]], "asks": [["2", "1"]]})
        assert book.state is BookState.LIVE
        assert book.book.top_bids(1) == [(1.0, 8.0)]
    assert h.feed.adapter.budget.used == 0


def test_settings_are_a_value_and_apply_to_connections_made_after():
    h = binance()
    h.feed.settings = dataclasses.replace(h.feed.settings, handover_overlap=0.5)
    successor, _ = rotate_and_open_successor(h)
    assert successor.settings.handover_overlap == 0.5


def test_a_frame_sent_while_demand_frames_are_built_is_paced_with_them():
    """An adapter may send() from inside subscribe_frame (Coinbase subscribes its
    heartbeats then): that must not start a second send loop."""
    h = binance([])
    sent_at = []
    send = h.protocol.sendMessage
    h.protocol.sendMessage = lambda payload, isBinary=False: (sent_at.append(h.clock.seconds()),
                                                              send(payload, isBinary))
    original = h.feed.adapter.subscribe_frame

    def subscribe_and_note(connection, symbols):
        connection.send({"note": symbols[0]})
        return original(connection, symbols)

    h.feed.adapter.subscribe_frame = subscribe_and_note
    send_loops = []

    def step(seconds):
        h.clock.advance(seconds)
        send_loops.append(sum(1 for call in h.clock.getDelayedCalls() if "_drain" in repr(call.func)))

    for symbol in EXTRA:
        h.feed.watch(ExchangeBook("binance", symbol, h._changed))
        step(0)
        for _ in range(10):
            step(0.1)
    for _ in range(40):
        step(0.05)
    assert len(sent_at) == 6  # three SUBSCRIBEs, three notes
    for i in range(len(sent_at) - 3):
        assert sent_at[i + 3] - sent_at[i] >= 1.0 - 1e-9  # never more than 3 a second
    assert max(send_loops) == 1  # one send loop, never a stray second one
