import math

import pytest

from aggregator.book import InvalidLevel, OrderBook, parse_levels


def book_with(bids, asks):
    book = OrderBook()
    book.replace(bids, asks)
    return book


def test_replace_sorts_sides_best_first():
    book = book_with([(1.0, 2.0), (3.0, 1.0), (2.0, 5.0)], [(5.0, 1.0), (4.0, 2.0), (6.0, 3.0)])
    assert book.top_bids(10) == [(3.0, 1.0), (2.0, 5.0), (1.0, 2.0)]
    assert book.top_asks(10) == [(4.0, 2.0), (5.0, 1.0), (6.0, 3.0)]
    assert book.top_bids(2) == [(3.0, 1.0), (2.0, 5.0)]
    assert book.top_asks(0) == [] and book.top_bids(0) == []


def test_apply_sets_absolute_amounts_and_zero_deletes():
    book = book_with([(1.0, 2.0), (2.0, 1.0)], [(3.0, 1.0)])
    book.apply([(1.0, 7.0), (2.0, 0.0), (0.5, 1.0)], [(3.0, 0.0), (3.5, 2.0)])
    assert book.top_bids(10) == [(1.0, 7.0), (0.5, 1.0)]
    assert book.top_asks(10) == [(3.5, 2.0)]


def test_deleting_an_absent_level_is_fine():
    book = book_with([(1.0, 2.0)], [])
    book.apply([(9.0, 0.0)], [(9.5, 0.0)])
    assert book.top_bids(10) == [(1.0, 2.0)] and book.top_asks(10) == []


def test_snapshot_zero_amounts_are_skipped():
    book = book_with([(1.0, 0.0), (2.0, 1.0)], [])
    assert book.top_bids(10) == [(2.0, 1.0)]


@pytest.mark.parametrize(
    "level",
    [(math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (1.0, math.inf),
     (-1.0, 1.0), (0.0, 1.0), (1.0, -0.5), (-math.inf, 1.0), (1e300, 1.0), (1.0, 1e16)],
)
def test_bad_numbers_are_rejected_and_the_book_is_unchanged(level):
    book = book_with([(1.0, 2.0)], [(3.0, 1.0)])
    with pytest.raises(InvalidLevel):
        book.apply([(1.5, 1.0), level], [])
    with pytest.raises(InvalidLevel):
        book.apply([], [(2.5, 1.0), level])
    with pytest.raises(InvalidLevel):
        book.replace([level], [])
    assert book.top_bids(10) == [(1.0, 2.0)]
    assert book.top_asks(10) == [(3.0, 1.0)]


def test_parse_levels_reads_decimal_strings_numerically():
    assert parse_levels([["0.35120000", "6567.00000000"], ["1", "0.00000"]]) == [
        (0.3512, 6567.0), (1.0, 0.0)]
    # JSON numbers are read as they are (Kraken sends numbers); a NaN or inf
    # that gets through as a float is the book's range check's to reject.
    assert parse_levels([[1.5, 2]]) == [(1.5, 2.0)]
    levels = parse_levels([[float("nan"), 1.0], [1.0, float("inf")]])
    with pytest.raises(InvalidLevel):
        OrderBook().apply(levels, [])


@pytest.mark.parametrize(
    "text", ["NaN", "inf", "-1", "1_000", " 12", "+5", "1,5", "0x10", "", "1e5e5", "-0", "\u0663", "1\n", ".5"]
)
def test_parse_levels_rejects_text_that_is_not_a_venue_decimal(text):
    # float() takes most of these ("1_000" is 1000.0); no venue sends them.
    with pytest.raises(InvalidLevel):
        parse_levels([[text, "1"]])
    with pytest.raises(InvalidLevel):
        parse_levels([["1", text]])


@pytest.mark.parametrize("raw", [["12", "34"], "1234", [("1", "2")], [["1", "2", "3"]], [[True, "1"]], {"1": "2"}])
def test_parse_levels_rejects_wrong_shapes(raw):
    # A string where a [price, amount] pair belongs is not two levels "1","2".
    with pytest.raises(InvalidLevel):
        parse_levels(raw)


@pytest.mark.parametrize(
    "raw", [[["abc", "1"]], [["1"]], [[None, "1"]], [["1", {}]], None, [5], [["1", ""]]]
)
def test_parse_levels_rejects_unparsable(raw):
    with pytest.raises(InvalidLevel):
        parse_levels(raw)


def test_crossed_detection():
    assert book_with([(2.0, 1.0)], [(1.5, 1.0)]).is_crossed()
    assert book_with([(2.0, 1.0)], [(2.0, 1.0)]).is_crossed()
    assert not book_with([(1.0, 1.0)], [(2.0, 1.0)]).is_crossed()
    assert not book_with([], [(2.0, 1.0)]).is_crossed()


def test_a_bad_level_among_good_ones_is_found_wherever_it_is():
    good = [["1.5", "2"], ["1.4", "0"]]
    for bad in (["1.3", "1_0"], ["x", "1"], [1.3, "nan"], ["1.3"]):
        for at in range(3):
            with pytest.raises(InvalidLevel):
                parse_levels(good[:at] + [bad] + good[at:])


@pytest.mark.parametrize("seed", range(40))
def test_top_changed_says_no_only_when_the_top_is_the_same(seed):
    import random

    rng = random.Random(seed)
    book = OrderBook()
    book.replace([(float(p), 1.0) for p in range(1, 40)], [(float(p), 1.0) for p in range(41, 80)])
    depth = rng.choice([1, 3, 10])
    assert book.top_changed(depth)  # a replace changes everything
    for _ in range(60):
        before = (book.top_bids(depth), book.top_asks(depth))
        for _ in range(rng.randint(1, 3)):  # several applies, one question
            bids = [(float(rng.randint(1, 45)), float(rng.choice([0, 0, 1, 2]))) for _ in range(rng.randint(0, 3))]
            asks = [(float(rng.randint(36, 85)), float(rng.choice([0, 0, 1, 2]))) for _ in range(rng.randint(0, 3))]
            book.apply(bids, asks)
        after = (book.top_bids(depth), book.top_asks(depth))
        if not book.top_changed(depth):
            assert after == before
    book.clear()
    assert book.top_changed(depth)
    assert not book.top_changed(depth)  # asked again: nothing since
