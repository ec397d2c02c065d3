"""Binance spot market data, server side (PROTOCOLS.md §1): combined-stream diff depth over
websocket at /stream, and the /api/v3 depth + exchangeInfo REST endpoints.

One module per job: `wire` (stream names, depthUpdate frames), `hub` (subscriptions,
conflation, batch writes), `stream` (the websocket endpoint and its rules), `rest` (REST
endpoints, request weights, error bodies); this one assembles them as the `BinanceVenue`.
"""

from __future__ import annotations

import copy
import random
from typing import TYPE_CHECKING

from .. import fixtures
from ..faults import REASON_24H, REASON_PONG_TIMEOUT
from ..market import fixed
from ..rest import RestGate, WeightLimiter
from ..venue import Servers, Venue, VenueSetup
from .hub import DepthHub
from .rest import (
    BAN_SECONDS,
    USED_WEIGHT_HEADER,
    WEIGHT_LIMIT,
    BinanceRestResource,
    error_body,
    exchange_info_symbols,
    request_weight,
)
from .stream import CONNECTION_LIFETIME, MAX_MESSAGES_PER_SECOND, BinanceWebSocketFactory
from .wire import SEND_TIME_FIELD, parse_stream

if TYPE_CHECKING:
    from ..scale import ScaleSpec

__all__ = [
    "BAN_SECONDS",
    "BinanceVenue",
    "CONNECTION_LIFETIME",
    "DepthHub",
    "MAX_MESSAGES_PER_SECOND",
    "SEND_TIME_FIELD",
    "WEIGHT_LIMIT",
    "exchange_info_symbols",
    "parse_stream",
]

# Binance REST weight is counted per clock minute (§1.6).
WEIGHT_WINDOW = 60.0


class BinanceVenue(Venue):
    name = "binance"
    scale_share = 1.0
    synthetic_half_spread = 0.6
    close_reasons = ((1001, REASON_24H), (1008, REASON_PONG_TIMEOUT))
    synthetic_symbols = frozenset({"ethbtc", "btcusdt", "ethusdt", "ltcbtc", "btceur"})

    def build(self, setup: VenueSetup) -> Servers:
        limits = setup.limits
        ws = BinanceWebSocketFactory(
            setup.markets,
            setup.reactor,
            on_violation=setup.on_violation,
            batch=setup.batch,
            max_messages_per_second=limits.max_messages_per_second,
            connection_lifetime=limits.connection_lifetime,
        )
        resource = BinanceRestResource(
            setup.markets,
            setup.reactor,
            exchange_info_symbols(setup.markets, setup.listings),
            limits.rest_weight_limit,
        )
        gate = RestGate(
            self.name,
            resource,
            setup.reactor,
            WeightLimiter(limits.rest_weight_limit, WEIGHT_WINDOW, limits.rest_ban_seconds),
            weigher=request_weight,
            used_header=USED_WEIGHT_HEADER,
            error_body=error_body(limits.rest_weight_limit, setup.reactor),
            on_violation=setup.on_violation,
            control=setup.control,
        )
        # The hub as what it is (Servers.hub only promises venue.Hub): the faults need it.
        self._depth = ws.hub
        return Servers(ws, ws.hub, resource, gate)

    @staticmethod
    def decimals(symbol: str, tick_exp: int) -> tuple[int, int]:
        # Binance writes every number with 8 decimals (PROTOCOLS §1.5).
        return 8, 8

    @staticmethod
    def first_update_id(rng: random.Random) -> int:
        return rng.randrange(10**8, 10**9)

    @staticmethod
    def scale_listing(spec: ScaleSpec) -> dict:
        entry = copy.deepcopy(fixtures.binance_symbol_entry("ETHBTC") or {})
        tick = fixed(1, spec.tick_exp, 8)
        step = fixed(1, spec.size_exp, 8)
        entry.update(
            symbol=spec.symbol.upper(),
            status="TRADING",
            baseAsset=spec.base,
            quoteAsset=spec.quote,
            permissions=["SPOT"],
            filters=[
                {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00000000", "tickSize": tick},
                {"filterType": "LOT_SIZE", "minQty": step, "maxQty": "9000000.00000000", "stepSize": step},
            ],
        )
        return entry

    def end_tick(self) -> None:
        self._depth.end_tick()

    def lose_next_update(self, symbol: str) -> None:
        # Every depth stream of the symbol loses its next frame: a U..u gap.
        self._depth.lose_next(symbol)

    def skip_updates(self, symbol: str, count: int) -> tuple[int, int]:
        return self._depth.skip_ids(symbol, count)
