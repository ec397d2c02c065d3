"""Binance's REST endpoints (PROTOCOLS.md §1.5, §1.6): /api/v3/depth and /api/v3/exchangeInfo,
and what rest.RestGate needs to account for them the Binance way: request weights and the
JSON error bodies of refused requests."""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Mapping

import orjson
from twisted.web.resource import Resource
from twisted.web.server import Request

from .. import fixtures
from ..clock import Clock
from ..market import Market

SYMBOL_PARAM_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
JSON = b"application/json;charset=UTF-8"  # what api.binance.com sends
# REST request weight budget per minute (§1.6); enforced by rest.RestGate.
WEIGHT_LIMIT = 6000
# REQUEST_WEIGHT etc. advertised by exchangeInfo (the weight limit is replaced by the one in force).
RATE_LIMITS = [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]
USED_WEIGHT_HEADER = b"x-mbx-used-weight-1m"
# Length of the IP ban (418) for a request sent before a 429's Retry-After elapsed.
BAN_SECONDS = 120.0


def request_weight(path: str, args: Mapping[bytes, list[bytes]] | None) -> int:
    """Binance's request weight of a REST request (§1.6): depth by limit, exchangeInfo 20."""
    if path == "/api/v3/depth":
        raw = ((args or {}).get(b"limit") or [b"100"])[0]
        limit = int(raw) if raw.isdigit() else 100
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    if path == "/api/v3/exchangeInfo":
        return 20
    return 1


def rate_limits(weight_limit: int = WEIGHT_LIMIT) -> list[dict]:
    """exchangeInfo `rateLimits`, advertising the request-weight budget in force."""
    limits = copy.deepcopy(RATE_LIMITS)
    limits[0]["limit"] = weight_limit
    return limits


def error_body(limit: int, clock: Clock) -> Callable[[int, float], tuple[bytes, bytes]]:
    """Binance's JSON error bodies (code -1003 for 429/418, -1001 for server errors)."""

    def body(status: int, retry_after: float) -> tuple[bytes, bytes]:
        if status == 429:
            msg = (
                f"Too much request weight used; current limit is {limit} request weight per 1 MINUTE. "
                "Please use WebSocket Streams for live updates to avoid polling the API."
            )
            payload = {"code": -1003, "msg": msg}
        elif status == 418:
            until = int((clock.seconds() + retry_after) * 1000)
            msg = (
                f"Way too much request weight used; IP banned until {until}. "
                "Please use WebSocket Streams for live updates to avoid bans."
            )
            payload = {"code": -1003, "msg": msg}
        elif status >= 500:
            payload = {"code": -1001, "msg": "Internal error; unable to process your request. Please try again."}
        else:
            payload = {"code": -1000, "msg": "An unknown error occurred while processing the request."}
        return JSON, orjson.dumps(payload)

    return body


def exchange_info_symbols(served: Iterable[str], listings: Mapping[str, dict] | None = None) -> list[dict]:
    """exchangeInfo `symbols` entries: the recorded entry of each served symbol (as TRADING),
    or the one given in `listings` (generated symbols), plus one recorded BREAK symbol that is
    not served, so clients can test status filtering."""
    served = sorted(served)
    listings = listings or {}
    recorded = fixtures.binance_recording().exchange_info.get("symbols", [])
    template = fixtures.binance_symbol_entry("ETHBTC") or {}
    entries = []
    for symbol in served:
        listed = listings.get(symbol) or fixtures.binance_symbol_entry(symbol)
        entry = copy.deepcopy(listed or template)
        if listed is None:  # the template's assets are ETH and BTC: this one's are its own
            entry["baseAsset"], entry["quoteAsset"] = fixtures.split_symbol(symbol)
        entry["symbol"] = symbol.upper()
        entry["status"] = "TRADING"
        entries.append(entry)
    served_upper = {s.upper() for s in served}
    for entry in recorded:
        if entry.get("status") == "BREAK" and entry["symbol"] not in served_upper:
            entries.append(copy.deepcopy(entry))
            break
    return entries


class BinanceRestResource(Resource):
    """GET /api/v3/exchangeInfo and /api/v3/depth (weights, limits and REST faults are
    rest.RestGate's job)."""

    isLeaf = True

    def __init__(
        self,
        markets: Mapping[str, Market],
        clock: Clock,
        symbols: list[dict],
        weight_limit: int = WEIGHT_LIMIT,
    ):
        super().__init__()
        self._markets = markets
        self._clock = clock
        self._symbols = symbols
        self._rate_limits = rate_limits(weight_limit)
        # symbol -> updates ago: the next snapshot of that symbol is served stale (fault).
        self.stale: dict[str, int] = {}

    def _json(self, request: Request, body: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", JSON)
        return orjson.dumps(body)

    def _error(self, request: Request, code: int, msg: str) -> bytes:
        return self._json(request, {"code": code, "msg": msg}, 400)

    def render_GET(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        if path == "/api/v3/depth":
            return self._depth(request)
        if path == "/api/v3/exchangeInfo":
            return self._exchange_info(request)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"Not Found"

    @staticmethod
    def _arg(request: Request, name: str) -> str | None:
        args: dict[bytes, list[bytes]] = request.args or {}
        values = args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def _depth(self, request: Request) -> bytes:
        symbol = self._arg(request, "symbol")
        if not symbol:
            return self._error(request, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if not SYMBOL_PARAM_RE.match(symbol):
            return self._error(
                request, -1100, "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
            )
        market = self._markets.get(symbol.lower())
        if market is None:
            return self._error(request, -1121, "Invalid symbol.")
        raw_limit = self._arg(request, "limit") or "100"
        if not raw_limit.isdigit():
            return self._error(
                request, -1100, "Illegal characters found in parameter 'limit'; legal range is '^[0-9]{1,20}$'."
            )
        limit = min(max(int(raw_limit), 1), 5000)
        updates_ago = self.stale.pop(market.symbol, 0)
        if updates_ago:
            # Fault: the book and id as they were some change events ago.
            book, last_id, _ = market.as_of(updates_ago)
            bids, asks = book.levels(limit)
        else:
            # The true book as of the last id applied, including changes not yet flushed to
            # sockets: their ids are > L, so a client's sync procedure handles them.
            bids, asks = market.book.levels(limit)
            last_id = market.last_update_id
        body = {"lastUpdateId": last_id, "bids": bids, "asks": asks}
        return self._json(request, body)

    def _exchange_info(self, request: Request) -> bytes:
        symbols = self._symbols
        one = self._arg(request, "symbol")
        many = self._arg(request, "symbols")
        if one is not None or many is not None:
            try:
                wanted = [one] if one is not None else orjson.loads(many or "")
            except orjson.JSONDecodeError:
                wanted = None
            if not isinstance(wanted, list) or not all(isinstance(s, str) for s in wanted):
                return self._error(request, -1100, "Illegal characters found in parameter 'symbols'.")
            by_name = {e["symbol"]: e for e in self._symbols}
            if any(s not in by_name for s in wanted):
                return self._error(request, -1121, "Invalid symbol.")
            symbols = [by_name[s] for s in wanted]
        body = {
            "timezone": "UTC",
            "serverTime": int(self._clock.seconds() * 1000),
            "rateLimits": self._rate_limits,
            "exchangeFilters": [],
            "symbols": symbols,
        }
        return self._json(request, body)
