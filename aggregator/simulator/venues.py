"""The venues the simulator serves, in the order of their listeners and URLs. A new venue's
simulator is one module with a venue.Venue subclass, added here."""

from __future__ import annotations

from .binance import BinanceVenue
from .bitstamp import BitstampVenue
from .bybit import BybitVenue
from .coinbase import CoinbaseVenue
from .kraken import KrakenVenue
from .venue import Venue

VENUES: tuple[type[Venue], ...] = (BinanceVenue, BitstampVenue, BybitVenue, CoinbaseVenue, KrakenVenue)
EXCHANGES = tuple(venue.name for venue in VENUES)
