"""Shared pieces of the end-to-end tests: the daemon built by the twistd
plugin against a simulator, gRPC watchers, and a reference merge written
independently of the daemon's."""

import asyncio

import grpc
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc
from aggregator.simulator.venues import EXCHANGES

DEPTH = 10


def plugin():
    (maker,) = [p for p in getPlugins(IServiceMaker) if p.tapname == "aggregator"]
    return maker


def reference_top(books: dict, depth: int = DEPTH):
    """books: exchange -> (bids {price: amount}, asks {price: amount})."""
    bids = [(e, p, a) for e, (b, _) in books.items() for p, a in b.items()]
    asks = [(e, p, a) for e, (_, s) in books.items() for p, a in s.items()]
    bids.sort(key=lambda l: (-l[1], -l[2], l[0]))
    asks.sort(key=lambda l: (l[1], -l[2], l[0]))
    return bids[:depth], asks[:depth]


def as_tuples(summary):
    return ([(l.exchange, l.price, l.amount) for l in summary.bids],
            [(l.exchange, l.price, l.amount) for l in summary.asks])


class Watcher:
    """One gRPC stream per symbol, keeping the latest Summary of each."""

    def __init__(self, port: int, symbols):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = orderbook_pb2_grpc.AggregatorStub(self.channel)
        self.latest = {}
        self.counts = {symbol: 0 for symbol in symbols}
        self.errors = []
        self.calls = {s: self.stub.BookSummary(orderbook_pb2.Request(symbol=s)) for s in symbols}
        self.tasks = [asyncio.ensure_future(self._read(s, c)) for s, c in self.calls.items()]

    async def _read(self, symbol, call):
        try:
            async for summary in call:
                self.latest[symbol] = summary
                self.counts[symbol] += 1
        except asyncio.CancelledError:
            pass  # close() cancels the call
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.CANCELLED:
                self.errors.append((symbol, error))

    async def close(self):
        for call in self.calls.values():
            call.cancel()
        await asyncio.gather(*self.tasks)
        await self.channel.close()


async def start_daemon(sim, *extra, configure=None):
    """The daemon as `twistd aggregator` builds it, pointed at `sim`.

    `configure(daemon)` runs between makeService and startService (tests use it
    to shorten timeouts and backoff)."""
    options = plugin().options()
    urls = [(f"--{key.replace('_', '-')}", url) for key, url in sim.urls.items()]
    options.parseOptions([
        "--listen", "127.0.0.1:0",
        "--exchanges", ",".join(EXCHANGES),
        *(arg for pair in urls for arg in pair),
        *extra,
    ])
    daemon = plugin().makeService(options)
    if configure is not None:
        configure(daemon)
    daemon.startService()
    await daemon.getServiceNamed("grpc").whenStarted()
    return daemon


def expected_from_simulator(sim, symbol: str):
    """The reference merge of the simulator's true books for `symbol`."""
    books = {}
    for exchange in EXCHANGES:
        if symbol in sim.symbols(exchange):
            bids, asks = sim.true_book(exchange, symbol)
            books[exchange] = (dict(bids), dict(asks))
    return reference_top(books)
