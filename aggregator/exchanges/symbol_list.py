"""A venue's instrument list: loaded over REST at start, retried until it is."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aggregator.http import JsonHttp
from aggregator.instruments import Instrument


class SymbolList:
    """The instruments a venue trades, by canonical symbol; None until loaded.

    Waiters are cancellable, and a cancelled one is forgotten at once: a
    daemon refusing requests while a list cannot load keeps nothing per
    refused request.
    """

    log = Logger()

    def __init__(
        self,
        venue: str,
        url: str,
        parse: Callable[[Any], Iterable[Instrument]],
        http: JsonHttp,
        reactor: IReactorTime,
        retry_delay: Callable[[int], float],
        weight: float = 1.0,
    ) -> None:
        self.venue = venue
        self.url = url
        self._parse = parse
        self._http = http
        self._reactor = reactor
        self._retry_delay = retry_delay
        self._weight = weight
        self.symbols: frozenset[str] | None = None
        self.instruments: dict[str, Instrument] = {}
        self.by_native: dict[str, str] = {}
        self._waiters: list[Deferred[None]] = []
        self._attempts = 0
        self._request: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._stopped = False

    def when_loaded(self) -> Deferred[None]:
        if self.symbols is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def start(self) -> None:
        self._stopped = False
        self._load()

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        request, self._request = self._request, None
        if request is not None:
            request.cancel()

    def _load(self) -> None:
        self._retry = None
        request = self._request = self._http.get_json(self.url, weight=self._weight)
        request.addCallbacks(self._loaded, self._failed)

    def _loaded(self, document: Any) -> None:
        self._request = None
        try:
            listed = list(self._parse(document))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            self._failed(Failure(error))
            return
        instruments: dict[str, Instrument] = {}
        ambiguous: set[str] = set()
        for instrument in listed:
            other = instruments.setdefault(instrument.symbol, instrument)
            if other is not instrument and (other.base, other.quote) != (instrument.base, instrument.quote):
                ambiguous.add(instrument.symbol)
        for symbol in sorted(ambiguous):
            # Two markets whose names concatenate alike (AB/CDEF, ABC/DEF): neither
            # is served rather than one silently standing in for the other.
            self.log.warn("{venue}: {symbol} names two markets; neither is served",
                          venue=self.venue, symbol=symbol)
            del instruments[symbol]
        self.instruments = instruments
        self.by_native = {instrument.native: symbol for symbol, instrument in instruments.items()}
        self.symbols = frozenset(instruments)
        self.log.info("{venue}: {count} symbols listed", venue=self.venue, count=len(instruments))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _failed(self, reason: Failure) -> None:
        self._request = None
        if self._stopped:
            return  # cancelled by stop()
        delay = self._retry_delay(self._attempts)
        self._attempts += 1
        self.log.warn(
            "{venue}: cannot load the symbol list ({error}); retrying in {delay:.1f}s",
            venue=self.venue, error=reason.value, delay=delay,
        )
        self._retry = self._reactor.callLater(delay, self._load)
