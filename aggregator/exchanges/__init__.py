"""Venue adapters, by their wire name (docs/DESIGN.md, "The feed layer")."""

from aggregator.exchanges.binance import BinanceAdapter
from aggregator.exchanges.bitstamp import BitstampAdapter
from aggregator.exchanges.bybit import BybitAdapter
from aggregator.exchanges.coinbase import CoinbaseAdapter
from aggregator.exchanges.kraken import KrakenAdapter
from aggregator.exchanges.venue import AdapterFactory

VENUES: dict[str, AdapterFactory] = {
    BinanceAdapter.name: BinanceAdapter,
    BitstampAdapter.name: BitstampAdapter,
    BybitAdapter.name: BybitAdapter,
    CoinbaseAdapter.name: CoinbaseAdapter,
    KrakenAdapter.name: KrakenAdapter,
}
