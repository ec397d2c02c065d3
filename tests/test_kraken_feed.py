import random

import orjson
import pytest
from prometheus_client import REGISTRY

from aggregator.book import BookState
from aggregator.exchanges.kraken import KrakenAdapter, book_checksum, subscription_depth
from tests import recorded
from tests.fakes import FakeProtocol, FeedHarness

# Kraken's own names: X/Z-prefixed codes, XBT in the wsname.
ASSET_PAIRS = {"error": [], "result": {
    "XXBTZUSD": {"altname": "XBTUSD", "wsname": "XBT/USD", "base": "XXBT", "quote": "ZUSD",
                 "pair_decimals": 1, "lot_decimals": 8, "status": "online"},
    "XETHXXBT": {"altname": "ETHXBT", "wsname": "ETH/XBT", "base": "XETH", "quote": "XXBT",
                 "pair_decimals": 5, "lot_decimals": 8, "status": "online"},
    "XXDGZEUR": {"altname": "XDGEUR", "wsname": "XDG/EUR", "base": "XXDG", "quote": "ZEUR",
                 "pair_decimals": 7, "lot_decimals": 8, "status": "cancel_only"},
    "XETHZUSD.d": {"altname": "ETHUSD.d", "base": "XETH", "quote": "ZUSD",
                   "pair_decimals": 2, "lot_decimals": 8},
}}
DECIMALS = {"BTC/USD": (1, 8), "ETH/BTC": (5, 8)}


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def level_text(level, price_decimals, size_decimals):
    """A level as Kraken writes it: its numbers at the pair's precision."""
    price, size = level
    return f"{price:.{price_decimals}f}", f"{size:.{size_decimals}f}"


def text(native, levels):
    price_decimals, size_decimals = DECIMALS[native]
    return [level_text(level, price_decimals, size_decimals) for level in levels]


def checksum_of(native, bids, asks):
    """The checksum of a book (levels as floats, any order) as Kraken computes it."""
    top_asks = sorted(asks)[:10]
    top_bids = sorted(bids, reverse=True)[:10]
    return book_checksum(text(native, top_asks), text(native, top_bids))


def book(kind, native, bids=(), asks=(), checksum=None, full=None):
    """A v2 book message; `full`: (bids, asks) of the whole book after it, for the checksum."""
    if checksum is None:
        checksum = checksum_of(native, *(full or (bids, asks)))
    data = {"symbol": native, "bids": [{"price": p, "qty": q} for p, q in bids],
            "asks": [{"price": p, "qty": q} for p, q in asks], "checksum": checksum,
            "timestamp": "2026-12-06T01:00:00.000000Z"}
    return orjson.dumps({"channel": "book", "type": kind, "data": [data]})


def ack(native, req_id, depth=10):
    return orjson.dumps({"method": "subscribe", "result": {"channel": "book", "depth": depth,
                         "snapshot": True, "symbol": native, "warnings": []},
                         "success": True, "req_id": req_id})


def refusal(native, req_id, error="Already subscribed"):
    return orjson.dumps({"method": "subscribe", "success": False, "error": error,
                         "symbol": native, "req_id": req_id})


BIDS = [(60000.1, 1.5), (59999.0, 0.25)]
ASKS = [(60001.0, 2.0), (60002.5, 0.00100000)]


class Harness(FeedHarness):
    def __init__(self, symbols=("btcusd",)):
        super().__init__(KrakenAdapter, symbols, start_time=1700000000, document=ASSET_PAIRS)

    def pump(self, seconds=1.0):
        """Let time pass in steps: paced frames leave one by one."""
        for _ in range(round(seconds * 10)):
            self.clock.advance(0.1)

    def subscribes(self, protocol=None):
        return [f for f in (protocol or self.protocol).frames() if f["method"] == "subscribe"]

    def live(self, native="BTC/USD", bids=BIDS, asks=ASKS):
        self.pump()
        req_id = self.subscribes()[-1]["req_id"]
        self.receive(ack(native, req_id))
        self.receive(book("snapshot", native, bids, asks))


def test_asset_pairs_give_v2_names_aliases_and_precision():
    h = Harness()
    instruments = {i.native: i for i in h.feed.adapter.parse_symbol_list(ASSET_PAIRS)}
    assert set(instruments) == {"BTC/USD", "ETH/BTC"}  # cancel_only and no-wsname pairs left out
    btc = instruments["BTC/USD"]
    assert (btc.symbol, btc.price_decimals, btc.size_decimals) == ("btcusd", 1, 8)
    assert instruments["ETH/BTC"].symbol == "ethbtc"


def test_the_recorded_asset_pairs_parse():
    (line,) = [line for line in recorded.read("KRAKEN.0") if line.kind == "http"]
    document = orjson.loads(line.payload)
    instruments = {i.native: i for i in Harness().feed.adapter.parse_symbol_list(document)}
    assert len(instruments) == 293
    btc = instruments["BTC/USD"]
    assert (btc.base, btc.quote, btc.price_decimals, btc.size_decimals) == ("BTC", "USD", 1, 8)
    assert instruments["DOGE/USD"].symbol == "dogeusd"  # XDG


def test_depth_is_the_smallest_kraken_accepts_that_covers_the_served_depth():
    assert [subscription_depth(n) for n in (1, 10, 11, 25, 26, 500, 5000)] == [
        10, 10, 25, 25, 100, 500, 1000]


def test_subscribes_at_depth_then_goes_live_on_a_checksummed_snapshot():
    h = Harness(["btcusd", "ethbtc"])
    h.pump()
    assert h.protocol.frames() == [{"method": "subscribe", "params": {
        "channel": "book", "symbol": ["BTC/USD", "ETH/BTC"], "depth": 10}, "req_id": 1}]
    # A snapshot before the acknowledgement belongs to no subscription of ours.
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert h.books["btcusd"].state is BookState.SYNCING
    h.receive(ack("BTC/USD", 1))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert h.books["btcusd"].state is BookState.LIVE
    assert h.books["btcusd"].book.top_asks(10) == ASKS
    assert h.books["ethbtc"].state is BookState.SYNCING  # its own ack is still due


def test_updates_apply_with_deletes_and_every_checksum_is_checked():
    h = Harness()
    h.live()
    bids = [(60000.1, 1.5), (60000.0, 3.0)]
    asks = [(60002.5, 0.001)]
    h.receive(book("update", "BTC/USD", [(60000.0, 3.0), (59999.0, 0.0)], [(60001.0, 0.0)],
                   full=(bids, asks)))
    assert h.books["btcusd"].state is BookState.LIVE
    assert h.books["btcusd"].book.top_bids(10) == bids
    assert h.books["btcusd"].book.top_asks(10) == asks
    assert len(h.changes) == 2  # go-live, then the update's commit


def test_levels_pushed_past_the_depth_are_truncated_by_us():
    h = Harness()
    bids = [(60000.0 - i, 1.0) for i in range(10)]
    h.live(bids=bids, asks=ASKS)
    better = (60000.5, 2.0)
    # Kraken sends the insert only: the 11th bid gets no delete.
    after = [better] + bids[:9]
    h.receive(book("update", "BTC/USD", [better], [], full=(after, ASKS)))
    assert h.books["btcusd"].state is BookState.LIVE
    assert h.books["btcusd"].book.top_bids(20) == after


def test_checksum_mismatch_withdraws_and_resubscribes_for_a_new_snapshot():
    h = Harness()
    h.live()
    before = metric("aggregator_resyncs_total", exchange="kraken", reason="checksum")
    h.receive(book("update", "BTC/USD", [(60000.0, 1.0)], [], checksum=12345))
    b = h.books["btcusd"]
    assert b.state is BookState.STALE and b.book.top_bids(10) == []
    assert metric("aggregator_resyncs_total", exchange="kraken", reason="checksum") == before + 1
    h.pump()
    assert [f["method"] for f in h.protocol.frames()[-2:]] == ["unsubscribe", "subscribe"]
    assert h.protocol.frames()[-2]["params"] == {"channel": "book", "symbol": ["BTC/USD"], "depth": 10}
    # The old subscription's tail is ignored until the new snapshot.
    h.receive(book("update", "BTC/USD", [(1.0, 1.0)], []))
    assert b.state is BookState.STALE
    h.receive(ack("BTC/USD", h.subscribes()[-1]["req_id"]))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert b.state is BookState.LIVE and b.book.top_bids(10) == BIDS


def test_a_bad_snapshot_checksum_resyncs_too():
    h = Harness()
    h.pump()
    h.receive(ack("BTC/USD", 1))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS, checksum=1))
    assert h.books["btcusd"].state is BookState.STALE


def test_persistent_mismatches_back_off():
    h = Harness()
    h.feed.retry_policy = lambda attempt: 5.0
    h.live()
    for _ in range(2):
        h.receive(book("update", "BTC/USD", [(60000.0, 1.0)], [], checksum=1))
        h.pump()
        h.receive(ack("BTC/USD", h.subscribes()[-1]["req_id"]))
        h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    # The first restart is immediate; the second, right after, waits 5 s.
    h.receive(book("update", "BTC/USD", [(60000.0, 1.0)], [], checksum=1))
    sent = len(h.subscribes())
    h.clock.advance(4)
    assert len(h.subscribes()) == sent
    h.clock.advance(2)
    assert len(h.subscribes()) == sent + 1


def test_crossed_book_resyncs():
    h = Harness()
    h.live()
    before = metric("aggregator_resyncs_total", exchange="kraken", reason="crossed")
    bids = BIDS + [(60001.5, 1.0)]
    h.receive(book("update", "BTC/USD", [(60001.5, 1.0)], [], full=(bids, ASKS)))
    assert h.books["btcusd"].state is BookState.STALE
    assert metric("aggregator_resyncs_total", exchange="kraken", reason="crossed") == before + 1


@pytest.mark.parametrize("level, checksum", [
    ({"price": "NaN", "qty": 1.0}, 0), ({"price": 60000.0, "qty": -1.0}, 0),
    ({"price": [60000.0], "qty": 1.0}, 0), ({"price": 60000.0}, 0), ([60000.0, 1.0], 0),
    ({"price": 60000.0, "qty": 1.0}, "123"), ({"price": 60000.0, "qty": 1.0}, None)])
def test_bad_numbers_and_shapes_are_rejected_counted_and_resynced(level, checksum):
    h = Harness()
    h.live()
    rejects = sum(metric("aggregator_rejects_total", exchange="kraken", reason=r)
                  for r in ("bad_number", "bad_data"))
    data = {"symbol": "BTC/USD", "bids": [level], "asks": []}
    if checksum is not None:
        data["checksum"] = checksum
    h.receive(orjson.dumps({"channel": "book", "type": "update", "data": [data]}))
    assert h.books["btcusd"].state is BookState.STALE
    assert sum(metric("aggregator_rejects_total", exchange="kraken", reason=r)
               for r in ("bad_number", "bad_data")) == rejects + 1
    h.pump()
    assert h.protocol.frames()[-1]["method"] == "subscribe"


def test_unknown_and_malformed_frames_do_not_break_the_feed():
    h = Harness()
    h.live()
    for frame in [b"not json", b"[]", b'{"channel":"heartbeat"}',
                  b'{"channel":"status","type":"update","data":[{"system":"online"}]}',
                  b'{"method":"pong","req_id":9}', b'{"channel":"book","type":"other","data":[]}',
                  b'{"channel":"book","type":"update","data":[{"symbol":"NO/SUCH"}]}',
                  b'{"channel":"trade","type":"update","data":[]}']:
        h.receive(frame)
    assert h.books["btcusd"].state is BookState.LIVE


def test_refused_subscription_is_retried_with_backoff_after_an_unsubscribe():
    h = Harness()
    h.feed.retry_policy = lambda attempt: 2.0 * (attempt + 1)
    h.pump()
    before = metric("aggregator_subscribe_retries_total", exchange="kraken", reason="refused")
    h.receive(refusal("BTC/USD", 1))
    assert h.books["btcusd"].state is BookState.SYNCING and "refused" in h.books["btcusd"].reason
    assert metric("aggregator_subscribe_retries_total", exchange="kraken", reason="refused") == before + 1
    h.pump()
    assert [f["method"] for f in h.protocol.frames()] == ["subscribe", "unsubscribe"]
    h.clock.advance(1.1)
    assert h.protocol.frames()[-1]["method"] == "subscribe"
    h.receive(ack("BTC/USD", h.subscribes()[-1]["req_id"]))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert h.books["btcusd"].state is BookState.LIVE


def test_a_refusal_naming_no_pair_refuses_the_whole_request():
    h = Harness(["btcusd", "ethbtc"])
    h.pump()
    h.receive(orjson.dumps({"method": "subscribe", "success": False, "error": "Invalid", "req_id": 1}))
    h.pump(5)
    assert sorted(s for f in h.subscribes()[1:] for s in f["params"]["symbol"]) == ["BTC/USD", "ETH/BTC"]


def test_unanswered_subscription_is_sent_again():
    h = Harness()
    before = metric("aggregator_subscribe_retries_total", exchange="kraken", reason="timeout")
    h.clock.advance(h.feed.settings.reply_timeout + 0.5)
    h.pump()
    assert len(h.subscribes()) == 2
    assert metric("aggregator_subscribe_retries_total", exchange="kraken", reason="timeout") == before + 1


def test_idle_connection_is_probed_with_a_ping():
    h = Harness()
    h.pump()
    h.feed.adapter.idle_probe(h.connection)
    h.pump()
    assert h.protocol.frames()[-1]["method"] == "ping"


def test_disconnect_marks_stale_and_reconnect_resubscribes():
    h = Harness()
    h.live()
    h.connection.connection_closed(h.protocol, "code=1006")
    assert h.books["btcusd"].state is BookState.STALE
    protocol = FakeProtocol()
    h.connection.connection_opened(protocol)
    h.pump()
    assert [f["method"] for f in protocol.frames()] == ["subscribe"]
    h.protocol = protocol
    h.receive(ack("BTC/USD", protocol.frames()[0]["req_id"]))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert h.books["btcusd"].state is BookState.LIVE


def test_rewatched_while_still_streaming_gets_a_new_snapshot():
    h = Harness()
    h.live()
    h.feed.unwatch("btcusd")
    h.feed.watch(h.books["btcusd"])  # before the unsubscribe left: still streaming
    # Updates were not followed meanwhile: the levels are not vouched for.
    assert h.books["btcusd"].state is BookState.SYNCING
    h.pump()
    assert [f["method"] for f in h.protocol.frames()[-2:]] == ["unsubscribe", "subscribe"]
    h.receive(ack("BTC/USD", h.subscribes()[-1]["req_id"]))
    h.receive(book("snapshot", "BTC/USD", BIDS, ASKS))
    assert h.books["btcusd"].state is BookState.LIVE


def test_handover_keeps_the_book_live_from_the_successors_own_stream():
    h = Harness()
    h.live()
    b = h.books["btcusd"]
    h.feed.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    new = FakeProtocol()
    successor.connection_opened(new)
    h.clock.advance(0.5)
    (subscribe,) = [f for f in new.frames() if f["method"] == "subscribe"]
    # The successor's acknowledgement and snapshot: kept aside, the book stays as it is.
    successor.message_received(ack("BTC/USD", subscribe["req_id"]))
    bids = [(60000.1, 1.0)]
    successor.message_received(book("snapshot", "BTC/USD", bids, ASKS))
    assert b.state is BookState.LIVE and b.book.top_bids(10) == BIDS
    # The old connection still serves until the handover.
    h.receive(book("update", "BTC/USD", [(59999.0, 0.0)], [], full=(BIDS[:1], ASKS)))
    assert b.book.top_bids(10) == BIDS[:1]
    h.clock.advance(h.feed.settings.handover_overlap + 0.1)
    assert h.feed.connections[0] is successor
    assert b.state is BookState.LIVE and b.book.top_bids(10) == bids
    # From here on the successor's updates count, the old connection's do not.
    h.receive(book("update", "BTC/USD", [(1.0, 1.0)], [], checksum=1))
    successor.message_received(book("update", "BTC/USD", [(60000.0, 2.0)], [],
                                    full=(bids + [(60000.0, 2.0)], ASKS)))
    assert b.state is BookState.LIVE and b.book.top_bids(10) == bids + [(60000.0, 2.0)]


def test_handover_before_the_successors_snapshot_starts_over_there():
    h = Harness()
    h.live()
    h.feed.rotate(h.connection, "test")
    successor = h.connector.started[-1]
    new = FakeProtocol()
    successor.connection_opened(new)
    h.pump(h.feed.settings.handover_overlap + 1)
    assert h.feed.connections[0] is successor
    assert h.books["btcusd"].state is BookState.SYNCING  # the old stream is gone
    assert [f["method"] for f in new.frames()][-2:] == ["unsubscribe", "subscribe"]


def test_prices_and_sizes_read_as_floats_scale_back_to_their_digits_exactly():
    """orjson reads v2 numbers as floats: a checksum field (the digits without
    the point and leading zeros) is the float times 10**decimals, rounded —
    exact for numbers of up to 15 significant digits."""
    rng = random.Random(1)
    for _ in range(20000):
        decimals = rng.randint(0, 10)
        digits = rng.randint(1, 15)
        units = rng.randrange(10 ** (digits - 1), 10 ** digits)
        whole, fraction = divmod(units, 10 ** decimals)
        written = f"{whole}.{fraction:0{decimals}d}" if decimals else str(whole)
        value = orjson.loads(written.encode())
        assert str(round(float(value) * 10 ** decimals)) == written.replace(".", "").lstrip("0")


def test_every_recorded_checksum_is_reproduced():
    """Kraken's own CRC32s (websocket v1: the same checksum over the same
    text, sent as strings), recomputed with the adapter's function."""
    books = {}
    matched = []
    for line in recorded.read("KRAKEN.ws.50.0"):
        message = orjson.loads(line.payload) if line.kind == "recv" else None
        if not isinstance(message, list):
            continue
        pair, depth = message[-1], int(message[-2].split("-")[1])
        parts = message[1:-2]
        if "as" in parts[0] or "bs" in parts[0]:
            books[pair] = ({float(p): (p, q) for p, q, *_ in parts[0].get("bs", [])},
                           {float(p): (p, q) for p, q, *_ in parts[0].get("as", [])})
            continue
        bids, asks = books[pair]
        expected = None
        for part in parts:
            for key, side in (("a", asks), ("b", bids)):
                for price, qty, *_ in part.get(key, []):
                    if float(qty) == 0:
                        side.pop(float(price), None)
                    else:
                        side[float(price)] = (price, qty)
            expected = part.get("c", expected)
        for side, worst_first in ((bids, sorted(bids)), (asks, sorted(asks, reverse=True))):
            for price in worst_first[: max(0, len(side) - depth)]:
                del side[price]
        if expected is not None:
            actual = book_checksum([asks[p] for p in sorted(asks)[:10]],
                                   [bids[p] for p in sorted(bids, reverse=True)[:10]])
            matched.append(actual == int(expected))
    assert len(matched) == 4269
    assert all(matched)


def test_the_book_checksum_from_floats_is_the_checksum_of_the_venues_text():
    # order_book_checksum scales the floats to integers instead of formatting
    # them: the same CRC as the text Kraken writes, for any pair precision.
    from aggregator.book import OrderBook
    from aggregator.exchanges.kraken import order_book_checksum
    from aggregator.instruments import Instrument

    rng = random.Random(7)
    for _ in range(2000):
        price_decimals, size_decimals = rng.randint(0, 10), rng.randint(0, 10)
        instrument = Instrument("X/Y", "X", "Y", price_decimals, size_decimals)

        def text(decimals, digits):
            units = rng.randrange(1, 10 ** digits)
            whole, fraction = divmod(units, 10 ** decimals)
            return f"{whole}.{fraction:0{decimals}d}" if decimals else str(whole)

        levels = {(text(price_decimals, rng.randint(1, 15)), text(size_decimals, rng.randint(1, 15)))
                  for _ in range(rng.randint(1, 30))}
        levels = {float(p): (p, q) for p, q in levels}  # one level per price
        middle = sorted(levels)[len(levels) // 2]
        bids = {p: pq for p, pq in levels.items() if p <= middle}
        asks = {p: pq for p, pq in levels.items() if p > middle}
        book = OrderBook()
        book.replace([(p, float(q)) for p, (_, q) in bids.items()],
                     [(p, float(q)) for p, (_, q) in asks.items()])
        expected = book_checksum([asks[p] for p in sorted(asks)[:10]],
                                 [bids[p] for p in sorted(bids, reverse=True)[:10]])
        assert order_book_checksum(book, instrument) == expected
