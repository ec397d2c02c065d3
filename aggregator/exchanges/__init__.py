"""Exchange feeds, by their wire name."""

from aggregator.exchanges.binance import BinanceFeed
from aggregator.exchanges.bitstamp import BitstampFeed
from aggregator.exchanges.feed import ExchangeFeed

FEEDS: dict[str, type[ExchangeFeed]] = {
    BinanceFeed.name: BinanceFeed,
    BitstampFeed.name: BitstampFeed,
}
