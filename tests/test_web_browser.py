"""The live view in a real browser (issue 11, section 2): headless Chromium,
driven over the DevTools protocol, opens the demo daemon's page and must show
the merged ladder with levels of several venues, updating.

Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it
when missing); without it this test is skipped. With WEB_VIEW_SCREENSHOT=path
the page's screenshot is also written there (docs/web-view.png, for the README).
"""

import base64
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from aggregator._proto.orderbook_pb2 import ExchangeState, Level, Summary
from tests.aio import aio, wait_until
from tests.e2e import plugin

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VENUES = "binance,bitstamp,bybit,coinbase,kraken"  # all list ethbtc in the synthetic demo

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="needs Chromium for the browser test of the live view: `apt-get install chromium` "
           "(Debian; .ci/run installs it when missing)",
)


class DevTools(WebSocketClientProtocol):
    """A minimal Chrome DevTools Protocol client: a command, its result."""

    def __init__(self):
        super().__init__()
        self.ids = itertools.count(1)
        self.waiting: dict[int, Deferred] = {}
        self.opened = Deferred()

    def onOpen(self):
        self.opened.callback(self)

    def command(self, method, **params) -> Deferred:
        message_id = next(self.ids)
        self.waiting[message_id] = Deferred()
        self.sendMessage(json.dumps({"id": message_id, "method": method, "params": params}).encode())
        return self.waiting[message_id]

    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        waiter = self.waiting.pop(message.get("id"), None)
        if waiter is None:
            return  # an event: not subscribed to any, but some come anyway
        if "error" in message:
            waiter.errback(RuntimeError(message["error"]))
        else:
            waiter.callback(message["result"])

    def onClose(self, wasClean, code, reason):
        for waiter in self.waiting.values():
            waiter.errback(ConnectionError(reason))
        self.waiting.clear()

    async def evaluate(self, expression):
        result = await self.command("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


async def until(predicate, timeout):
    await aio(wait_until(predicate, timeout, interval=0.1))


async def devtools_port(profile: Path, browser, timeout=30.0):
    """Chromium writes the port it picked (--remote-debugging-port=0) here."""
    active = profile / "DevToolsActivePort"
    await until(lambda: active.exists() and active.read_text().strip() or browser.poll() is not None,
                timeout)
    assert browser.poll() is None, f"chromium exited with status {browser.returncode}"
    return int(active.read_text().split()[0])


async def page_target(port):
    response = await treq.get(f"http://127.0.0.1:{port}/json/list", persistent=False)
    targets = await treq.json_content(response)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


LADDER = """JSON.stringify({
  venues: [...new Set([...document.querySelectorAll('#ladder tr[data-venue]')]
             .map(row => row.dataset.venue))].sort(),
  rows: document.querySelectorAll('#ladder tr[data-venue]').length,
  text: document.getElementById('ladder').innerText,
  symbol: document.getElementById('symbol').textContent,
  spread: document.getElementById('spread').textContent,
  states: [...document.querySelectorAll('#venues tbody tr')].map(row => row.innerText),
  error: document.getElementById('error').hidden ? '' : document.getElementById('error').textContent,
})"""


@pytest_twisted.ensureDeferred
async def test_the_page_shows_every_venues_levels_and_updates(tmp_path):
    options = plugin().options()
    options.parseOptions(["--demo", "--demo-source", "synthetic", "--exchanges", VENUES,
                          "--listen", "127.0.0.1:0", "--web", "127.0.0.1:0"])
    daemon = plugin().makeService(options)
    daemon.startService()
    browser = devtools = None
    try:
        url = daemon.getServiceNamed("web").url()
        profile = tmp_path / "profile"
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1100,720", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port = await devtools_port(profile, browser)
        factory = WebSocketClientFactory(await page_target(port))
        factory.protocol = DevTools
        built = []
        factory.buildProtocol = lambda addr, build=factory.buildProtocol: built.append(build(addr)) or built[-1]
        connectWS(factory)
        await until(lambda: built, 10)
        devtools = built[0]
        await devtools.opened

        seen = {}

        async def look():
            value = await devtools.evaluate(LADDER)  # None while the page is still loading
            seen.update(json.loads(value) if value else {"venues": [], "text": None, "error": ""})

        # Every venue's levels in the ladder (all five list ethbtc in the demo).
        for _ in range(300):
            await look()
            if len(seen["venues"]) == 5:
                break
            await deferLater(reactor, 0.1)
        assert len(seen["venues"]) >= 2, seen
        assert seen["symbol"] == "ethbtc" and not seen["error"], seen
        assert seen["rows"] == 20, seen  # --depth 10 per side
        assert len(seen["states"]) == 5 and all("LIVE" in state for state in seen["states"]), seen
        first = seen["text"]
        # And it moves.
        for _ in range(100):
            await look()
            if seen["text"] != first:
                break
            await deferLater(reactor, 0.1)
        assert seen["text"] != first, "the ladder did not change in 10 s"

        # The page's decoder against the generated classes' encoding: a crossed
        # book, a non-ASCII reason, a 64-bit timestamp, a field it does not know.
        summary = Summary(
            spread=-0.5,
            bids=[Level(exchange="kraken", price=100000.25, amount=1e-8)],
            asks=[Level(exchange="binance", price=99999.75, amount=3.5),
                  Level(exchange="bybit", price=100001.0, amount=0.125)],
            exchanges=[ExchangeState(exchange="bybit", state=ExchangeState.STALE,
                                     reason="gap — resyncing"),
                       ExchangeState(exchange="kraken", state=ExchangeState.LIVE)],
            timestamp_us=1764990000123456,
        ).SerializeToString() + b"\x78\x01"  # field 15, varint 1
        decoded = json.loads(await devtools.evaluate(
            "JSON.stringify(SummaryDecoder.decode(Uint8Array.from(atob('%s'), c => c.charCodeAt(0)).buffer))"
            % base64.b64encode(summary).decode()))
        assert decoded == {
            "spread": -0.5,
            "bids": [{"exchange": "kraken", "price": 100000.25, "amount": 1e-8}],
            "asks": [{"exchange": "binance", "price": 99999.75, "amount": 3.5},
                     {"exchange": "bybit", "price": 100001.0, "amount": 0.125}],
            "exchanges": [{"exchange": "bybit", "state": "STALE", "reason": "gap — resyncing"},
                          {"exchange": "kraken", "state": "LIVE", "reason": ""}],
            "timestampUs": 1764990000123456,
        }

        shot = await devtools.command("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG")
        (tmp_path / "web-view.png").write_bytes(png)
        if os.environ.get("WEB_VIEW_SCREENSHOT"):
            Path(os.environ["WEB_VIEW_SCREENSHOT"]).write_bytes(png)

        # A symbol the daemon cannot serve: the page says why.
        await devtools.command("Page.navigate", url=url + "?symbol=nosuch")
        for _ in range(100):
            await look()
            if seen.get("error"):
                break
            await deferLater(reactor, 0.1)
        assert "symbol 'nosuch' is not listed by any enabled exchange" in seen["error"], seen
        assert seen["rows"] == 0
    finally:
        if devtools is not None:
            devtools.sendClose()
        if browser is not None:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
        await daemon.stopService()
