"""The live view's websocket and HTTP side, over loopback, without a browser:
a page's stream is one Subscription whose bytes go out unchanged, one frame
in flight, released when the page goes (issue 11, section 2)."""

import json

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from aggregator._proto.orderbook_pb2 import Summary
from aggregator.address import CannotListen
from aggregator.merger import Merger, Subscription, SymbolListsUnavailable, TooManySymbols, UnknownSymbol
from aggregator.web import MAX_LISTED_SYMBOLS, REFUSED, STOPPING, SymbolListing, WebServer
from tests.aio import aio, wait_until
from tests.fakes import FakeFeed, publish


def until(predicate, timeout=5.0):
    return aio(wait_until(predicate, timeout))


class FakeSource:
    """The Merger as the view sees it: Subscriptions the test feeds by hand."""

    def __init__(self, feeds=()):
        self.feeds = {feed.name: feed for feed in feeds}
        self.subscriptions: list[Subscription] = []
        self.released: list[Subscription] = []
        self.refuse_with = None

    def subscribe(self, symbol, max_symbols=None):
        if self.refuse_with is not None:
            raise self.refuse_with
        if symbol == "nosuch":
            raise UnknownSymbol(f"symbol {symbol!r} is not listed by any enabled exchange")
        subscription = Subscription(symbol, self.released.append)
        subscription.offer(b"first " + symbol.encode())
        self.subscriptions.append(subscription)
        return subscription


class Page(WebSocketClientProtocol):
    """A browser's websocket: records what it gets."""

    def __init__(self):
        super().__init__()
        self.texts, self.binaries = [], []
        self.opened, self.closed = Deferred(), Deferred()
        self.close_code = None

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        (self.binaries if isBinary else self.texts).append(payload if isBinary else json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        self.closed.callback(code)


async def open_page(server, query=""):
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{server.port}/ws{query}")
    factory.protocol = Page
    pages = []
    original = factory.buildProtocol

    def build(addr):
        page = original(addr)
        pages.append(page)
        return page

    factory.buildProtocol = build
    connectWS(factory)
    await until(lambda: pages)
    await pages[0].opened
    return pages[0]


def start(source, **overrides):
    options = dict(default_symbol="ethbtc", max_clients=10, max_symbols=100, reactor=reactor)
    options.update(overrides)
    server = WebServer("127.0.0.1:0", source, **options)
    server.startService()
    return server


@pytest.fixture
def source():
    return FakeSource([FakeFeed("binance", {"ethbtc", "btcusdt"}), FakeFeed("bitstamp", {"ethbtc"})])


@pytest_twisted.ensureDeferred
async def test_a_page_gets_its_symbol_then_the_summaries_bytes_unchanged(source):
    server = start(source)
    try:
        page = await open_page(server, "?symbol=BTC-USDT")
        await until(lambda: page.binaries)
        assert page.texts == [{"symbol": "btcusdt"}]
        assert page.binaries == [b"first btcusdt"]
        (subscription,) = source.subscriptions
        summary = bytes(range(256)) * 4  # any bytes: the server never looks inside
        subscription.offer(summary)
        await until(lambda: len(page.binaries) == 2)
        assert page.binaries[1] == summary
        page.sendClose()
        await page.closed
        await until(lambda: source.released == [subscription])
        assert not server.clients.open
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_without_a_symbol_the_page_shows_the_default(source):
    server = start(source)
    try:
        page = await open_page(server)
        await until(lambda: page.binaries)
        assert page.texts == [{"symbol": "ethbtc"}]
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_summaries_offered_faster_than_sent_are_conflated_to_the_latest(source):
    server = start(source)
    try:
        page = await open_page(server)
        await until(lambda: page.binaries)
        (subscription,) = source.subscriptions
        # All in one reactor turn: the first goes out, the rest wait in the
        # Subscription's one slot and only the last of them is sent.
        for n in range(100):
            subscription.offer(b"summary %d" % n)
        await until(lambda: page.binaries[-1] == b"summary 99")
        assert page.binaries == [b"first ethbtc", b"summary 0", b"summary 99"]
        assert subscription.conflated == 98
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_a_page_that_stops_reading_holds_one_frame_not_a_queue(source):
    server = start(source)
    try:
        page = await open_page(server)
        await until(lambda: page.binaries)
        (subscription,) = source.subscriptions
        (client,) = server.clients.open
        page.transport.pauseProducing()  # the browser stops reading its socket
        big = 200 * 1024
        for n in range(250):  # 50 MB offered, more than loopback's socket buffers hold
            subscription.offer(n.to_bytes(2, "big") * (big // 2))
            await deferLater(reactor, 0.001)  # a reactor turn between offers
            buffered = sum(map(len, client.transport._tempDataBuffer)) + len(client.transport.dataBuffer)
            assert buffered <= big + 64, "more than one frame queued in the daemon"
        assert subscription.conflated > 0
        page.transport.resumeProducing()
        await until(lambda: page.binaries[-1][:2] == (249).to_bytes(2, "big"), timeout=20)
        assert len(page.binaries) - 1 < 250
    finally:
        await server.stopService()


@pytest.mark.parametrize("query, message", [
    ("?symbol=nosuch", "symbol 'nosuch' is not listed by any enabled exchange"),
    ("?symbol=e%24h", "malformed symbol 'e$h'"),  # not a symbol at all
    # Longer than a websocket close reason may be, in UTF-8.
    ("?symbol=" + "%C3%A9" * 60, "malformed symbol '" + "é" * 60),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_symbol_is_refused_with_a_message_for_the_page(source, query, message):
    server = start(source)
    try:
        page = await open_page(server, query)
        assert await page.closed == REFUSED
        (refusal,) = page.texts
        assert message in refusal["error"] and refusal["retry"] is False
        assert not page.binaries and not server.clients.open
    finally:
        await server.stopService()


@pytest.mark.parametrize("error", [
    SymbolListsUnavailable("symbol lists not loaded yet from: binance"),
    TooManySymbols("cannot watch 'ethbtc': the daemon already watches its limit of 1 symbols"),
])
@pytest_twisted.ensureDeferred
async def test_a_passing_refusal_tells_the_page_to_retry(source, error):
    source.refuse_with = error
    server = start(source)
    try:
        page = await open_page(server)
        assert await page.closed == REFUSED
        assert page.texts == [{"error": str(error), "retry": True}]
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_pages_beyond_the_limit_are_refused(source):
    server = start(source, max_clients=1)
    try:
        first = await open_page(server)
        second = await open_page(server)
        assert await second.closed == REFUSED
        assert second.texts[0]["error"].startswith("too many live-view clients")
        assert len(server.clients.open) == 1 and not first.closed.called
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_closes_the_pages_and_frees_their_subscriptions(source):
    server = start(source)
    page = await open_page(server)
    await server.stopService()
    assert await page.closed == STOPPING
    assert source.released == source.subscriptions


@pytest_twisted.ensureDeferred
async def test_with_the_merger_a_page_is_demand_and_closing_it_releases_it():
    binance, bitstamp = FakeFeed("binance", {"ethbtc"}), FakeFeed("bitstamp", {"ethbtc"})
    merger = Merger([binance, bitstamp], depth=3)
    merger.startService()
    server = start(merger)
    try:
        page = await open_page(server)
        assert binance.watched == bitstamp.watched == ["ethbtc"]
        publish(binance.books["ethbtc"], [(10.0, 1.0)], [(11.0, 2.0)])
        publish(bitstamp.books["ethbtc"], [(10.5, 1.0)], [(11.5, 2.0)])
        await until(lambda: page.binaries and Summary.FromString(page.binaries[-1]).asks[1:])
        summary = Summary.FromString(page.binaries[-1])
        assert page.binaries[-1] == merger.current_summary("ethbtc")
        assert [(l.exchange, l.price) for l in summary.bids] == [("bitstamp", 10.5), ("binance", 10.0)]
        page.sendClose()
        await page.closed
        await until(lambda: binance.unwatched == bitstamp.unwatched == ["ethbtc"])
    finally:
        await server.stopService()
        merger.stopService()


@pytest_twisted.ensureDeferred
async def test_the_page_its_assets_and_the_symbol_list_are_served(source):
    server = start(source)
    base = f"http://127.0.0.1:{server.port}"
    try:
        page = await aio_get(base + "/")
        assert page.code == 200 and b'<script src="/static/app.js">' in await treq.content(page)
        for asset, kind in [("app.js", "javascript"), ("summary.js", "javascript"), ("style.css", "css")]:
            response = await aio_get(f"{base}/static/{asset}")
            assert response.code == 200 and kind in response.headers.getRawHeaders("content-type")[0]
            await treq.content(response)
        listing = await treq.json_content(await aio_get(base + "/symbols"))
        assert listing == {"default": "ethbtc", "symbols": ["btcusdt", "ethbtc"], "truncated": False}
        for missing in ("/nothing", "/static/", "/static/nothing.js"):
            response = await aio_get(base + missing)
            assert response.code == 404, missing
            await treq.content(response)
    finally:
        await server.stopService()


async def aio_get(url):
    return await treq.get(url, persistent=False)


def test_the_symbol_list_is_capped():
    many = {f"sym{n:05d}" for n in range(MAX_LISTED_SYMBOLS + 5)}
    symbols, truncated = SymbolListing(FakeSource([FakeFeed("binance", many), FakeFeed("kraken")])).symbols()
    assert len(symbols) == MAX_LISTED_SYMBOLS and truncated and symbols == sorted(many)[:MAX_LISTED_SYMBOLS]


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_is_one_clear_error(source):
    server = start(source)
    try:
        taken = WebServer(f"127.0.0.1:{server.port}", source, default_symbol="ethbtc",
                          max_clients=1, max_symbols=1, reactor=reactor)
        with pytest.raises(CannotListen, match=f"cannot serve the live view on 127.0.0.1:{server.port}: "):
            taken.startService()
    finally:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_nothing_is_sent_once_closing(source):
    server = start(source)
    try:
        page = await open_page(server)
        await until(lambda: page.binaries)
        (client,) = server.clients.open
        (subscription,) = source.subscriptions
        page.transport.pauseProducing()  # the close handshake stays unanswered a while
        client.sendClose(STOPPING, "the daemon is stopping")
        subscription.offer(b"after the close")
        client.resumeProducing()  # as the transport does once the close frame is out
        assert client.sent == 1
        page.transport.resumeProducing()
        assert await page.closed == STOPPING
        assert page.binaries == [b"first ethbtc"]
    finally:
        await server.stopService()
