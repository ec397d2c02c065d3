"""The hand-written Summary encoding decodes to what the generated classes build."""

import math
import random

import pytest

from aggregator._proto import orderbook_pb2
from aggregator.wire import encode_summary

State = orderbook_pb2.ExchangeState


def reference(spread, bids, asks, exchanges, timestamp_us):
    return orderbook_pb2.Summary(
        spread=spread,
        bids=[orderbook_pb2.Level(exchange=e, price=p, amount=a) for e, p, a in bids],
        asks=[orderbook_pb2.Level(exchange=e, price=p, amount=a) for e, p, a in asks],
        exchanges=[State(exchange=e, state=s, reason=r) for e, s, r in exchanges],
        timestamp_us=timestamp_us,
    )


def same(decoded, expected):
    if math.isnan(expected.spread):
        assert math.isnan(decoded.spread)
        expected.spread = decoded.spread = 0.0
    assert decoded == expected


@pytest.mark.parametrize("seed", range(200))
def test_random_summaries_round_trip(seed):
    rng = random.Random(seed)
    def levels():
        return [(rng.choice(["binance", "bitstamp", "x" * rng.randint(0, 200)]),
                 rng.choice([rng.uniform(1e-8, 1e6), 0.0, 1e-300]), rng.choice([rng.uniform(0, 1e9), 0.0]))
                for _ in range(rng.randint(0, 12))]
    spread = rng.choice([rng.uniform(-10, 10), 0.0, math.nan, -1e-9])
    exchanges = [(rng.choice(["binance", "bitstamp"]), rng.choice([0, 1, 2, 3]),
                  rng.choice(["", "in sync", "disconnected: code=1006 é"])) for _ in range(rng.randint(0, 3))]
    timestamp = rng.choice([0, 1, 1_795_676_735_775_191, 2**62, -5])
    args = (spread, levels(), levels(), exchanges, timestamp)
    same(orderbook_pb2.Summary.FromString(encode_summary(*args)), reference(*args))


def test_empty_summary_is_just_the_nan_spread():
    encoded = encode_summary(math.nan, [], [])
    assert math.isnan(orderbook_pb2.Summary.FromString(encoded).spread)
    assert encode_summary(0.0, [], []) == b""


@pytest.mark.parametrize("seed", range(100))
def test_the_mergers_keyed_form_encodes_to_the_same_bytes(seed):
    from aggregator.wire import encode_exchange_states, encode_keyed_summary

    rng = random.Random(seed)
    # Book levels: price and amount never zero (zero deletes), best first.
    def side(reverse):
        prices = sorted({round(rng.uniform(1, 3), 3) for _ in range(rng.randint(0, 12))}, reverse=reverse)
        return [(rng.choice(["binance", "kraken"]), p, rng.uniform(1e-8, 1e6)) for p in prices]
    bids, asks = side(True), side(False)
    spread = asks[0][1] - bids[0][1] if bids and asks else math.nan
    exchanges = [("binance", 2, "in sync"), ("kraken", 3, "gap")][: rng.randint(0, 2)]
    timestamp = rng.choice([0, 1_700_000_000_000_000])
    keyed = encode_keyed_summary(
        [(-p, -a, e) for e, p, a in bids], [(p, -a, e) for e, p, a in asks],
        encode_exchange_states(tuple(exchanges)), timestamp,
    )
    assert keyed == encode_summary(spread, bids, asks, exchanges, timestamp)
