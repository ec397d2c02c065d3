import math
import sys

import pytest

from aggregator._proto.orderbook_pb2 import Summary
from aggregator.book import BookState
from aggregator.merger import Merger, SymbolListsUnavailable, UnknownSymbol
from tests.fakes import FakeFeed, publish


def summary_of(data: bytes) -> Summary:
    return Summary.FromString(data)


def levels(summary, side):
    return [(level.exchange, level.price, level.amount) for level in getattr(summary, side)]


@pytest.fixture
def feeds():
    return FakeFeed("binance", {"ethbtc", "btcusdt"}), FakeFeed("bitstamp", {"ethbtc", "ethusd"})


@pytest.fixture
def merger(feeds):
    merger = Merger(feeds, depth=3)
    merger.startService()
    yield merger
    merger.stopService()


def next_summary(subscription) -> Summary:
    results = []
    subscription.next().addCallback(results.append)
    assert results, "no Summary pending"
    return summary_of(results[0])


def test_merge_orders_best_first_with_tie_break_and_depth(merger, feeds):
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0), (9.0, 1.0), (8.0, 1.0)], [(11.0, 1.0), (12.0, 3.0)])
    publish(bitstamp.books["ethbtc"], [(10.0, 2.0), (9.5, 1.0)], [(11.0, 0.5), (11.5, 1.0)])
    summary = next_summary(subscription)
    assert levels(summary, "bids") == [
        ("bitstamp", 10.0, 2.0), ("binance", 10.0, 1.0), ("bitstamp", 9.5, 1.0)]
    assert levels(summary, "asks") == [
        ("binance", 11.0, 1.0), ("bitstamp", 11.0, 0.5), ("bitstamp", 11.5, 1.0)]
    assert summary.spread == pytest.approx(1.0)


def test_equal_price_and_amount_is_ordered_by_exchange_name(merger, feeds):
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    publish(bitstamp.books["ethbtc"], [(10.0, 1.0)], [])
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [])
    assert levels(next_summary(subscription), "bids") == [
        ("binance", 10.0, 1.0), ("bitstamp", 10.0, 1.0)]


def test_crossed_merged_book_has_negative_spread(merger, feeds):
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(10.5, 1.0)])
    publish(bitstamp.books["ethbtc"], [(10.2, 1.0)], [(10.1, 1.0)])
    summary = next_summary(subscription)
    assert summary.spread == pytest.approx(10.1 - 10.2)
    assert summary.spread < 0


def test_locked_book_has_zero_spread(merger, feeds):
    binance, _ = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(10.0, 2.0)])
    assert next_summary(subscription).spread == 0.0


@pytest.mark.parametrize("bids,asks", [([(10.0, 1.0)], []), ([], [(10.0, 1.0)]), ([], [])])
def test_empty_side_gives_nan_spread(merger, feeds, bids, asks):
    binance, _ = feeds
    subscription = merger.subscribe("ethbtc")
    next_summary(subscription)  # the initial, empty one
    publish(binance.books["ethbtc"], bids, asks)
    if bids or asks:
        summary = next_summary(subscription)
    else:
        summary = summary_of(merger.current_summary("ethbtc"))
    assert math.isnan(summary.spread)
    assert len(summary.bids) == len(bids) and len(summary.asks) == len(asks)


def test_new_subscriber_gets_the_current_summary_at_once(merger, feeds):
    binance, _ = feeds
    first = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 1.0)])
    second = merger.subscribe("ethbtc")
    assert levels(next_summary(second), "bids") == [("binance", 10.0, 1.0)]
    assert levels(next_summary(first), "bids") == [("binance", 10.0, 1.0)]


def test_initial_summary_before_any_data_is_empty_with_nan_spread(merger):
    summary = next_summary(merger.subscribe("ethbtc"))
    assert not summary.bids and not summary.asks and math.isnan(summary.spread)


def test_only_live_books_are_merged(merger, feeds):
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 1.0)])
    publish(bitstamp.books["ethbtc"], [(10.5, 1.0)], [(10.9, 1.0)])
    next_summary(subscription)
    bitstamp.books["ethbtc"].mark_stale("gap")
    assert bitstamp.books["ethbtc"].state is BookState.STALE
    summary = next_summary(subscription)
    assert {level.exchange for level in summary.bids} == {"binance"}
    assert {level.exchange for level in summary.asks} == {"binance"}


def test_changes_below_the_top_n_publish_nothing(merger, feeds):
    binance, _ = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0), (9.0, 1.0), (8.0, 1.0)], [(11.0, 1.0)])
    next_summary(subscription)
    published = merger.current_summary("ethbtc")
    binance.books["ethbtc"].book.apply([(7.0, 5.0)], [])
    binance.books["ethbtc"].commit(None)
    assert merger.current_summary("ethbtc") is published
    pending = []
    subscription.next().addCallback(pending.append)
    assert pending == []


def test_slow_subscriber_keeps_only_the_latest_summary(merger, feeds):
    binance, _ = feeds
    slow = merger.subscribe("ethbtc")
    fast = merger.subscribe("ethbtc")
    next_summary(fast)  # the initial, empty one
    publish(binance.books["ethbtc"], [], [])
    received = []
    for i in range(1000):
        fast.next().addCallback(received.append)
        binance.books["ethbtc"].book.apply([(10.0, 1.0 + i)], [])
        binance.books["ethbtc"].commit(None)
    assert len(received) == 1000
    assert slow.conflated == 1000  # all but the latest superseded
    assert len(slow.__dict__) == len(fast.__dict__)  # one slot, whatever the speed
    latest = next_summary(slow)
    assert levels(latest, "bids") == [("binance", 10.0, 1000.0)]
    assert sys.getsizeof(slow._pending or b"") < 200


def test_summary_is_serialized_once_per_change_for_all_subscribers(merger, feeds):
    binance, _ = feeds
    subscriptions = [merger.subscribe("ethbtc") for _ in range(3)]
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [])
    pending = [s._pending for s in subscriptions]
    assert all(p is pending[0] for p in pending)


def test_refcounting_watches_once_and_unwatches_after_the_last(merger, feeds):
    binance, bitstamp = feeds
    a = merger.subscribe("ethbtc")
    b = merger.subscribe("ethbtc")
    assert binance.watched == ["ethbtc"] and bitstamp.watched == ["ethbtc"]
    a.close()
    assert binance.unwatched == []
    b.close()
    b.close()  # idempotent
    assert binance.unwatched == ["ethbtc"] and bitstamp.unwatched == ["ethbtc"]
    assert merger.current_summary("ethbtc") is None


def test_symbol_listed_by_one_exchange_watches_only_that_one(merger, feeds):
    binance, bitstamp = feeds
    merger.subscribe("btcusdt")
    assert binance.watched == ["btcusdt"] and bitstamp.watched == []


def test_unknown_symbol(merger):
    with pytest.raises(UnknownSymbol, match="nosuch"):
        merger.subscribe("nosuch")


def test_symbol_lists_not_loaded_yet():
    late = FakeFeed("bitstamp")
    merger = Merger([FakeFeed("binance", {"ethbtc"}), late])
    merger.startService()
    with pytest.raises(SymbolListsUnavailable):
        merger.subscribe("ethusd")
    merger.subscribe("ethbtc")
    assert late.watched == []
    late.load({"ethbtc", "ethusd"})
    assert late.watched == ["ethbtc"]
    merger.subscribe("ethusd")


def test_pinned_symbols_are_held_once_listed():
    binance = FakeFeed("binance")
    merger = Merger([binance], pinned=["ethbtc", "nosuch"])
    merger.startService()
    binance.load({"ethbtc"})
    assert binance.watched == ["ethbtc"]
    subscription = merger.subscribe("ethbtc")
    subscription.close()
    assert binance.unwatched == []  # still pinned


def test_stop_ends_streams_after_pending_summary(feeds):
    merger = Merger(feeds)
    merger.startService()
    subscription = merger.subscribe("ethbtc")
    merger.stopService()
    assert next_summary(subscription) is not None
    ended = []
    subscription.next().addCallback(ended.append)
    assert ended == [None]


@pytest.mark.parametrize("seed", range(50))
def test_merged_keys_match_a_plain_sort_of_all_levels(seed):
    import random

    from aggregator.merger import book_keys, merge_keys

    def merged_levels(top):
        """Keyed merged levels → (exchange, price, amount), best first."""
        bids, asks = top
        return [(n, -p, -a) for p, a, n in bids], [(n, p, -a) for p, a, n in asks]

    rng = random.Random(seed)
    tops = []
    for name in ("binance", "bitstamp", "kraken")[: rng.randint(1, 3)]:
        bid_prices = sorted({round(rng.uniform(1, 2), 2) for _ in range(rng.randint(0, 15))}, reverse=True)
        ask_prices = sorted({round(rng.uniform(1.5, 2.5), 2) for _ in range(rng.randint(0, 15))})
        tops.append((name, [(p, float(rng.choice([1, 2, 3]))) for p in bid_prices],
                     [(p, float(rng.choice([1, 2, 3]))) for p in ask_prices]))
    bids = sorted(((n, p, a) for n, b, _ in tops for p, a in b), key=lambda l: (-l[1], -l[2], l[0]))
    asks = sorted(((n, p, a) for n, _, s in tops for p, a in s), key=lambda l: (l[1], -l[2], l[0]))
    merged = merge_keys([book_keys(*top) for top in tops], 10)
    assert merged_levels(merged) == (bids[:10], asks[:10])


# -- per-stream views: Request.exchanges and Request.depth ---------------------------


def test_a_view_of_some_exchanges_shows_only_their_levels_and_states(merger, feeds):
    binance, bitstamp = feeds
    everything = merger.subscribe("ethbtc")
    only_bitstamp = merger.subscribe("ethbtc", exchanges=["BITSTAMP"])
    next_summary(everything), next_summary(only_bitstamp)
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 1.0)])
    assert levels(next_summary(everything), "bids") == [("binance", 10.0, 1.0)]
    assert only_bitstamp.take() is None  # a binance change is nothing to this view
    publish(bitstamp.books["ethbtc"], [(9.0, 1.0)], [(12.0, 1.0)])
    summary = next_summary(only_bitstamp)
    assert levels(summary, "bids") == [("bitstamp", 9.0, 1.0)]
    assert [state.exchange for state in summary.exchanges] == ["bitstamp"]
    assert len(next_summary(everything).exchanges) == 2


def test_a_shallower_view_cuts_the_merge_and_equal_views_share_bytes(merger, feeds):
    binance, _ = feeds
    deep = merger.subscribe("ethbtc")
    shallow = merger.subscribe("ethbtc", depth=1)
    also_shallow = merger.subscribe("ethbtc", depth=1, exchanges=["binance", "bitstamp"])
    for subscription in (deep, shallow, also_shallow):
        subscription.take()
    publish(binance.books["ethbtc"], [(10.0, 1.0), (9.0, 1.0)], [(11.0, 1.0), (12.0, 1.0)])
    assert len(next_summary(deep).bids) == 2
    first, second = shallow.take(), also_shallow.take()
    assert first is second  # one serialization for both (all exchanges == no filter)
    assert levels(summary_of(first), "bids") == [("binance", 10.0, 1.0)]
    # A change below the shallow view's top sends it nothing.
    binance.books["ethbtc"].book.apply([(9.0, 5.0)], [])
    binance.books["ethbtc"].commit(None)
    assert next_summary(deep).bids[1].amount == 5.0
    assert shallow.take() is None


def test_views_refuse_unknown_exchanges_too_deep_and_unlisted(merger):
    from aggregator.merger import InvalidView

    with pytest.raises(InvalidView, match="kraken"):
        merger.subscribe("ethbtc", exchanges=["kraken"])
    with pytest.raises(InvalidView, match="--depth 3"):
        merger.subscribe("ethbtc", depth=4)
    with pytest.raises(UnknownSymbol, match="bitstamp"):
        merger.subscribe("btcusdt", exchanges=["bitstamp"])
    assert merger.books("ethbtc") == {}  # nothing held by a refused stream


def test_a_view_is_dropped_with_its_last_stream(merger):
    only = merger.subscribe("ethbtc", exchanges=["binance"])
    keeper = merger.subscribe("ethbtc")
    state = merger._symbols["ethbtc"]
    assert len(state.views) == 2
    only.close()
    assert len(state.views) == 1
    keeper.close()
    assert "ethbtc" not in merger._symbols


def test_two_markets_under_one_symbol_are_never_merged():
    """AB/CDEF on one venue and ABC/DEF on another are both "abcdef"."""
    from aggregator.merger import AmbiguousSymbol

    one, other = FakeFeed("binance", {"abcdef", "ethbtc"}), FakeFeed("bitstamp", {"abcdef", "ethbtc"})
    one.markets, other.markets = {"abcdef": ("AB", "CDEF")}, {"abcdef": ("ABC", "DEF")}
    merger = Merger([one, other], depth=3)
    merger.startService()
    with pytest.raises(AmbiguousSymbol, match="binance AB/CDEF, bitstamp ABC/DEF"):
        merger.subscribe("abcdef")
    assert one.watched == other.watched == []
    merger.subscribe("ethbtc")  # the others are served as usual
    merger.stopService()


# -- one re-merge per reactor turn (Merger given a reactor) ----------------------------


@pytest.fixture
def turn_merger(feeds):
    from twisted.internet.task import Clock

    clock = Clock()
    merger = Merger(feeds, depth=3, reactor=clock)
    merger.startService()
    yield merger, clock
    merger.stopService()
    assert clock.getDelayedCalls() == []


def _drained(subscription) -> list:
    """Every Summary the subscription has been offered since the last call."""
    got = []
    while True:
        data = subscription.take()
        if data is None:
            return got
        got.append((summary_of(data), subscription.arrival))


def test_changes_in_one_turn_are_merged_and_sent_once_with_the_earliest_arrival(turn_merger, feeds):
    from aggregator import metrics

    merger, clock = turn_merger
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    _drained(subscription)
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 1.0)])
    publish(bitstamp.books["ethbtc"], [(10.0, 2.0)], [(11.5, 1.0)])
    clock.advance(0)
    _drained(subscription)
    before = metrics.MERGES_COALESCED._value.get()
    book = binance.books["ethbtc"]
    for arrival, amount in ((5.0, 2.0), (4.0, 3.0), (6.0, 4.0)):
        book.book.apply([(10.0, amount)], [])
        book.commit(arrival)
    assert _drained(subscription) == [], "nothing is sent before the turn ends"
    clock.advance(0)
    ((summary, arrival),) = _drained(subscription)
    assert levels(summary, "bids") == [("binance", 10.0, 4.0), ("bitstamp", 10.0, 2.0)]
    assert arrival == 4.0
    assert metrics.MERGES_COALESCED._value.get() - before == 2


def test_a_turn_shows_the_committed_levels_not_a_later_uncommitted_change(turn_merger, feeds):
    # A sync may change the levels again before the turn ends (a transaction
    # spanning frames): only what it committed reaches clients.
    merger, clock = turn_merger
    binance, _ = feeds
    subscription = merger.subscribe("ethbtc")
    _drained(subscription)
    book = binance.books["ethbtc"]
    publish(book, [(10.0, 1.0)], [(11.0, 1.0)])
    book.book.apply([(10.5, 7.0)], [])  # not committed
    clock.advance(0)
    ((summary, _),) = _drained(subscription)
    assert levels(summary, "bids") == [("binance", 10.0, 1.0)]


def test_a_book_withdrawn_in_the_same_turn_is_not_shown(turn_merger, feeds):
    merger, clock = turn_merger
    binance, bitstamp = feeds
    subscription = merger.subscribe("ethbtc")
    publish(bitstamp.books["ethbtc"], [(9.0, 1.0)], [])
    clock.advance(0)
    _drained(subscription)
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [])
    binance.books["ethbtc"].mark_stale("gap")
    clock.advance(0)
    assert _drained(subscription) == [], "the merged levels ended where they were"


def test_a_symbol_released_before_its_turn_ends_is_not_merged(turn_merger, feeds):
    merger, clock = turn_merger
    binance, _ = feeds
    subscription = merger.subscribe("ethbtc")
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [])
    subscription.close()
    clock.advance(0)
    assert merger.books("ethbtc") == {}


def test_stopping_merges_what_is_due_and_leaves_no_timer(feeds):
    from twisted.internet.task import Clock

    clock = Clock()
    merger = Merger(feeds, depth=3, reactor=clock)
    merger.startService()
    subscription = merger.subscribe("ethbtc")
    _drained(subscription)
    publish(feeds[0].books["ethbtc"], [(10.0, 1.0)], [])
    merger.stopService()
    assert clock.getDelayedCalls() == []
    ((summary, _),) = _drained(subscription)
    assert levels(summary, "bids") == [("binance", 10.0, 1.0)]
    publish(feeds[0].books["ethbtc"], [(10.0, 2.0)], [])  # stopped: merged at once
    assert clock.getDelayedCalls() == []


# -- Subscription.wait: an asyncio Future per Summary, no Deferred ----------------------


@pytest.fixture
def loop():
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_wait_resolves_with_the_pending_summary_at_once(merger, loop):
    subscription = merger.subscribe("ethbtc")
    future = subscription.wait(loop)
    assert future.done() and future.result() is not None
    assert subscription.delivered == 1


def test_wait_is_resolved_by_the_next_offer_with_its_arrival(merger, feeds, loop):
    subscription = merger.subscribe("ethbtc")
    book = feeds[0].books["ethbtc"]
    publish(book, [(10.0, 1.0)], [])
    subscription.take()
    future = subscription.wait(loop)
    assert not future.done()
    book.book.apply([(10.0, 2.0)], [])
    book.commit(7.5)
    assert levels(summary_of(future.result()), "bids") == [("binance", 10.0, 2.0)]
    assert subscription.arrival == 7.5


def test_a_cancelled_wait_keeps_the_summary_for_the_next_reader(merger, feeds, loop):
    subscription = merger.subscribe("ethbtc")
    subscription.take()
    future = subscription.wait(loop)
    future.cancel()
    publish(feeds[0].books["ethbtc"], [(10.0, 1.0)], [])
    assert levels(summary_of(subscription.take()), "bids") == [("binance", 10.0, 1.0)]


def test_ending_resolves_a_waiting_future_with_none(merger, loop):
    subscription = merger.subscribe("ethbtc")
    subscription.take()
    future = subscription.wait(loop)
    subscription.end()
    assert future.result() is None
    assert subscription.wait(loop).result() is None


# -- a symbol nobody streams is merged when asked for -----------------------------------


def test_a_held_symbol_without_streams_is_merged_only_when_asked_for(merger, feeds):
    binance, bitstamp = feeds
    merger.hold("ethbtc")  # --symbols: watched, not streamed
    publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 1.0)])
    publish(bitstamp.books["ethbtc"], [(10.5, 1.0)], [])
    state = merger._symbols["ethbtc"]
    assert state.views[(None, 3)].published == ([], []), "nothing merged for nobody"
    assert levels(summary_of(merger.current_summary("ethbtc")), "bids") == [
        ("bitstamp", 10.5, 1.0), ("binance", 10.0, 1.0)]
    book = binance.books["ethbtc"]
    book.book.apply([(10.7, 2.0)], [])
    book.commit(3.0)
    subscription = merger.subscribe("ethbtc")
    assert levels(summary_of(subscription.take()), "bids") == [
        ("binance", 10.7, 2.0), ("bitstamp", 10.5, 1.0), ("binance", 10.0, 1.0)]
    assert subscription.arrival is None, "a change nobody waited for measures no latency"
    # Streamed now: every change is merged and offered.
    book.book.apply([(10.8, 1.0)], [])
    book.commit(4.0)
    assert levels(summary_of(subscription.take()), "bids")[0] == ("binance", 10.8, 1.0)
    assert subscription.arrival == 4.0
    subscription.close()
    book.book.apply([(10.9, 1.0)], [])
    book.commit(5.0)
    assert state.views[(None, 3)].published[0][0][0] == -10.8, "unstreamed again: not merged"
    assert levels(summary_of(merger.current_summary("ethbtc")), "bids")[0] == ("binance", 10.9, 1.0)
