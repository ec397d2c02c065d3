"""The taps --record puts on a feed: every connection's open, frames both ways
and close, over real loopback sockets, reported to the feed's observer."""

import orjson
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor

from aggregator.book import ExchangeBook
from aggregator.exchanges.binance import BinanceAdapter
from aggregator.exchanges.feed import VenueFeed
from tests.aio import aio, wait_until
from tests.fakes import FakeHttp, load_listing
from tests.test_feed_connection import RecordingServer


class Observer:
    def __init__(self):
        self.events = []

    def opened(self, label, url):
        self.events.append(("open", label, url))

    def received(self, label, payload, arrival):
        assert isinstance(arrival, float)
        self.events.append(("in", label, orjson.loads(payload)))

    def sent(self, label, payload):
        self.events.append(("out", label, orjson.loads(payload)))

    def closed(self, label, reason):
        self.events.append(("close", label))

    def responded(self, url, status, body):
        self.events.append(("rest", url, status))


@pytest_twisted.ensureDeferred
async def test_the_observer_sees_opens_frames_both_ways_and_closes():
    factory = WebSocketServerFactory()
    factory.protocol = RecordingServer
    factory.paths, factory.connections, factory.frames = [], [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    url = f"ws://127.0.0.1:{port.getHost().port}"
    http = FakeHttp()
    feed = VenueFeed(BinanceAdapter, url, "http://rest.test", reactor=reactor, http=http,
                     retry_policy=lambda attempt: 0.05)
    observer = Observer()
    feed.record_to(observer)
    assert http.observer is observer  # REST answers: JsonHttp's own hook (the fake has none)
    feed.watch(ExchangeBook("binance", "ethbtc", lambda book, arrival: None))
    feed.startService()
    load_listing(feed, http, ["ethbtc"])
    try:
        await aio(wait_until(lambda: len(observer.events) >= 3))
        label = "binance connection #1"
        subscribe = {"method": "SUBSCRIBE", "params": ["ethbtc@depth@100ms"], "id": 1}
        assert observer.events[:3] == [
            ("open", label, f"{url}/stream"),
            ("out", label, subscribe),
            ("in", label, {"result": None, "id": 1}),
        ]
        factory.connections[0].dropConnection(abort=True)
        await aio(wait_until(lambda: ("close", label) in observer.events))
        await aio(wait_until(lambda: ("open", label, f"{url}/stream") in observer.events[4:]))
    finally:
        await feed.stopService()
        await port.stopListening()
    await aio(wait_until(lambda: all(not c.transport.connected for c in factory.connections)))


@pytest_twisted.ensureDeferred
async def test_jsonhttp_shows_every_answer_to_its_observer_errors_included():
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from aggregator.http import HttpError, JsonHttp

    class Answers(Resource):
        isLeaf = True

        def render_GET(self, request):
            if request.path == b"/busy":
                request.setResponseCode(503)
            return b'{"ok": true}'

    site = Site(Answers())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    http = JsonHttp(reactor)
    observer = Observer()
    http.observer = observer
    try:
        assert await http.get_json(f"{base}/info?x=1") == {"ok": True}
        try:
            await http.get_json(f"{base}/busy")
        except HttpError:
            pass
        assert observer.events == [("rest", f"{base}/info?x=1", 200), ("rest", f"{base}/busy", 503)]
    finally:
        await http.close()
        await port.stopListening()
