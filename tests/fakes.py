"""Test doubles shared by the unit tests."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed


class FakeFeed:
    """A Feed as the merger sees it, recording watch/unwatch."""

    def __init__(self, name: str, symbols=None) -> None:
        self.name = name
        self._symbols = None if symbols is None else frozenset(symbols)
        self._waiters: list[Deferred] = []
        self.books = {}
        self.watched: list[str] = []
        self.unwatched: list[str] = []

    def listed_symbols(self):
        return self._symbols

    def when_symbols_loaded(self) -> Deferred:
        if self._symbols is not None:
            return succeed(None)
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    def load(self, symbols) -> None:
        self._symbols = frozenset(symbols)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def watch(self, book) -> None:
        self.books[book.symbol] = book
        self.watched.append(book.symbol)

    def unwatch(self, symbol: str) -> None:
        del self.books[symbol]
        self.unwatched.append(symbol)
