"""A feed's websocket leg over real loopback sockets: path, frames, reconnect, stop."""

import orjson
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

from aggregator.book import BookState, ExchangeBook
from aggregator.exchanges.binance import BinanceAdapter
from aggregator.exchanges.feed import VenueFeed
from tests.aio import aio, wait_until
from tests.fakes import FakeHttp, load_listing


class RecordingServer(WebSocketServerProtocol):
    def onConnect(self, request):
        self.factory.paths.append(request.path)
        self.factory.connections.append(self)

    def onMessage(self, payload, isBinary):
        frame = orjson.loads(payload)
        self.factory.frames.append(frame)
        self.sendMessage(orjson.dumps({"result": None, "id": frame["id"]}))


@pytest_twisted.ensureDeferred
async def test_feed_subscribes_reconnects_after_a_drop_and_stops_cleanly():
    factory = WebSocketServerFactory()
    factory.protocol = RecordingServer
    factory.paths, factory.connections, factory.frames = [], [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    http = FakeHttp()
    feed = VenueFeed(BinanceAdapter, f"ws://127.0.0.1:{port.getHost().port}", "http://rest.test",
                       reactor=reactor, http=http, retry_policy=lambda attempt: 0.05)
    book = ExchangeBook("binance", "ethbtc", lambda book, arrival: None)
    feed.watch(book)
    feed.startService()
    load_listing(feed, http, ["ethbtc"])
    try:
        await aio(wait_until(lambda: len(factory.frames) == 1))
        assert factory.paths == ["/stream"]
        assert factory.frames[0] == {"method": "SUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 1}
        await aio(wait_until(lambda: http.pending("http://rest.test/api/v3/depth")))
        http.answer("http://rest.test/api/v3/depth", {"lastUpdateId": 1, "bids": [["1", "1"]], "asks": []})
        assert book.state is BookState.LIVE

        factory.connections[0].dropConnection(abort=True)
        await aio(wait_until(lambda: book.state is BookState.STALE))
        await aio(wait_until(lambda: len(factory.frames) == 2))
        assert len(factory.connections) == 2
        assert factory.frames[1]["params"] == ["ethbtc@depth@100ms"]
        assert book.state is BookState.SYNCING
    finally:
        await feed.stopService()
        await port.stopListening()
    await aio(wait_until(lambda: all(not c.transport.connected for c in factory.connections)))
    leftovers = [call for call in reactor.getDelayedCalls()
                 if "aggregator" in repr(call.func) or "ClientService" in repr(call.func)]
    assert leftovers == []
