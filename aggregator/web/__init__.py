"""The live web view (`--web`): one page, served by the reactor, that shows a
symbol's merged book as it changes.

The page's websocket (`/ws?symbol=...`) is one Merger Subscription: the
Summary bytes the merger serialized once per change go to the browser
unchanged, as binary frames, and the page decodes them itself
(static/summary.js). No merge, no re-encoding, no per-client state beyond the
Subscription's one slot: a slow browser gets the latest Summary, never a queue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Protocol, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IPullProducer, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File
from zope.interface import implementer

from aggregator.address import CannotListen, is_loopback, split_host_port
from aggregator.merger import (
    InvalidView,
    Subscription,
    SymbolListsUnavailable,
    TooManySymbols,
    UnknownSymbol,
)
from aggregator.symbols import InvalidSymbol, normalize
from aggregator.throttled_log import ThrottledLog

STATIC = Path(__file__).resolve().parent / "static"
# The picker's list: enough to browse, small enough for one response. Any
# other symbol can still be typed in.
MAX_LISTED_SYMBOLS = 2000
# The page sends nothing but the websocket's own control frames: a client
# cannot make the daemon buffer more than one small frame...
MAX_INCOMING_FRAME = 1024
# ...nor a message longer than this. Autobahn applies the message limit to
# what it sends too: the largest Summary (--depth 1000, five venues' states)
# is under 80 KiB.
MAX_MESSAGE_BYTES = 256 * 1024
# Websocket close codes (Autobahn lets applications send 1000 and 3000-4999):
# a refusal, in the private-use range, so that it differs from a dropped
# connection; the daemon stopping is a normal closure.
REFUSED = 4000
STOPPING = 1000


class SummarySource(Protocol):
    """What the view needs from the Merger."""

    def subscribe(self, symbol: str, max_symbols: int | None = None) -> Subscription: ...

    @property
    def feeds(self) -> Any: ...


class SymbolListing:
    """The symbols the enabled exchanges list, for the page's picker."""

    def __init__(self, source: SummarySource, limit: int = MAX_LISTED_SYMBOLS) -> None:
        self.source = source
        self.limit = limit

    def symbols(self) -> tuple[list[str], bool]:
        """Sorted symbols (at most `limit`) and whether the list was cut."""
        listed: set[str] = set()
        for feed in self.source.feeds.values():
            listed.update(feed.listed_symbols() or ())
        ordered = sorted(listed)
        return ordered[: self.limit], len(ordered) > self.limit


class SymbolsResource(Resource):
    """GET /symbols: {"default": ..., "symbols": [...], "truncated": bool}."""

    isLeaf = True

    def __init__(self, listing: SymbolListing, default_symbol: str) -> None:
        super().__init__()
        self.listing = listing
        self.default_symbol = default_symbol

    def render_GET(self, request: Request) -> bytes:
        symbols, truncated = self.listing.symbols()
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        body = {"default": self.default_symbol, "symbols": symbols, "truncated": truncated}
        return json.dumps(body).encode()


class WebClients:
    """The open websocket clients: bounded in number, closed when the server stops."""

    def __init__(
        self,
        source: SummarySource,
        default_symbol: str,
        max_clients: int,
        max_symbols: int | None,
        clock: IReactorTime,
    ) -> None:
        self.source = source
        self.default_symbol = default_symbol
        self.max_clients = max_clients
        self.max_symbols = max_symbols
        self.open: set[SummaryStreamProtocol] = set()
        self.refusals = ThrottledLog(Logger(namespace=__name__), clock)


@implementer(IPullProducer)
class SummaryStreamProtocol(WebSocketServerProtocol):
    """One browser watching one symbol.

    A pull producer on its own transport: the transport asks for the next
    frame only once it has handed the previous one to the kernel, so at most
    one frame is ever in flight and the rest waits in the Subscription's single
    slot, where a newer Summary replaces an unsent one.
    """

    log = Logger()
    clients: WebClients  # set by the factory

    def __init__(self) -> None:
        super().__init__()
        self.symbol = ""
        self.peer_address = ""
        self.subscription: Subscription | None = None
        self.sent = 0
        self._writable = False  # the transport asked for a frame we have not sent
        self._waiting = False  # a next() is outstanding
        self.closed: Deferred[None] = Deferred()

    def onConnect(self, request: ConnectionRequest) -> None:
        self.peer_address = request.peer
        symbols = request.params.get("symbol") or [""]
        self.symbol = symbols[0].strip() or self.clients.default_symbol

    def onOpen(self) -> None:
        clients = self.clients
        if len(clients.open) >= clients.max_clients:
            self._refuse(
                f"too many live-view clients: the daemon serves at most {clients.max_clients}",
                retry=True,
            )
            return
        try:
            symbol = normalize(self.symbol)
            self.subscription = clients.source.subscribe(symbol, clients.max_symbols)
        except SymbolListsUnavailable as error:
            # Just started: the page retries until the lists are in.
            self._refuse(str(error), retry=True)
            return
        except TooManySymbols as error:
            self._refuse(str(error), retry=True)
            return
        except (InvalidSymbol, UnknownSymbol, InvalidView) as error:
            self._refuse(str(error), retry=False)
            return
        self.symbol = symbol
        clients.open.add(self)
        self.log.info("live view opened: {symbol} for {peer}", symbol=symbol, peer=self.peer_address)
        self.sendMessage(json.dumps({"symbol": symbol}).encode(), isBinary=False)
        # Twisted web's HTTP channel registered itself on this transport; the
        # connection is a websocket now, so the producer is this protocol.
        transport = cast(Any, self.transport)  # a TCP transport: a FileDescriptor
        if transport.producer is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, False)  # pull: asks for the first frame now

    def _refuse(self, message: str, *, retry: bool) -> None:
        self.clients.refusals.warn(
            (message, retry), "live view refused for {peer}: {reason}",
            peer=self.peer_address, reason=message,
        )
        self.sendMessage(json.dumps({"error": message, "retry": retry}).encode(), isBinary=False)
        # Autobahn cuts the reason to the 123 bytes a close frame holds; the
        # page shows the whole message sent above.
        self.sendClose(REFUSED, message)

    # -- IPullProducer ------------------------------------------------------

    def resumeProducing(self) -> None:
        self._writable = True
        self._send_next()

    def stopProducing(self) -> None:
        self._release()

    def _open(self) -> bool:
        # Closing (our close frame or theirs on its way): nothing more to send.
        return bool(self.state == WebSocketServerProtocol.STATE_OPEN)

    def _send_next(self) -> None:
        subscription = self.subscription
        if subscription is None or not self._writable or self._waiting or not self._open():
            return
        summary = subscription.take()
        if summary is not None:
            self._send_summary(summary)
            return
        self._waiting = True
        subscription.next().addCallback(self._arrived)

    def _arrived(self, summary: bytes | None) -> None:
        self._waiting = False
        if self.subscription is None or not self._open():
            return  # closed meanwhile
        if summary is None:  # the merger stopped
            self.sendClose(STOPPING, "the daemon is stopping")
            return
        self._send_summary(summary)  # only waited while the transport wanted a frame

    def _send_summary(self, summary: bytes) -> None:
        self._writable = False
        self.sent += 1
        self.sendMessage(summary, isBinary=True)

    # -- end ------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass  # the page has nothing to say; MAX_INCOMING_FRAME bounds it

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._release()
        if not self.closed.called:
            self.closed.callback(None)

    def _release(self) -> None:
        subscription, self.subscription = self.subscription, None
        if subscription is None:
            return
        self.clients.open.discard(self)
        subscription.close()
        self.log.info(
            "live view closed: {symbol} for {peer}", symbol=self.symbol, peer=self.peer_address
        )


class _SummaryStreamFactory(WebSocketServerFactory):
    protocol = SummaryStreamProtocol

    def __init__(self, clients: WebClients, keepalive: tuple[float, float]) -> None:
        super().__init__()
        self.clients = clients
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_INCOMING_FRAME,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            # Notice a vanished browser (laptop lid shut) and free its subscription.
            autoPingInterval=keepalive[0],
            autoPingTimeout=keepalive[1],
            # Bounds how long stopping waits for a browser to answer the close.
            closeHandshakeTimeout=1,
        )

    def buildProtocol(self, addr: Any) -> SummaryStreamProtocol:
        protocol = cast(SummaryStreamProtocol, super().buildProtocol(addr))
        protocol.clients = self.clients
        return protocol


class _Root(Resource):
    def __init__(self, children: Iterable[tuple[bytes, IResource]]) -> None:
        super().__init__()
        for name, child in children:
            self.putChild(name, child)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return File(str(STATIC / "index.html"), defaultType="text/html")
        return notFound()


class _Assets(File):
    """The page's script and style; no directory listing, no index."""

    indexNames: list[str] = []

    def directoryListing(self) -> IResource:
        return notFound()


class _WebSite(Site):
    noisy = False

    def logPrefix(self) -> str:
        return "live view HTTP"

    def log(self, request: HTTPRequest) -> None:
        pass  # no access-log line per asset


class WebServer(Service):
    """The live view's HTTP + websocket port. Listens in startService
    (twistd forks after makeService)."""

    log = Logger()

    def __init__(
        self,
        listen: str,
        source: SummarySource,
        *,
        default_symbol: str,
        max_clients: int,
        max_symbols: int | None,
        reactor: IReactorTCP,
        keepalive: tuple[float, float] = (20.0, 10.0),
    ) -> None:
        self.listen = listen
        self.reactor = reactor
        self.clients = WebClients(
            source, default_symbol, max_clients, max_symbols, cast(IReactorTime, reactor)
        )
        self.keepalive = keepalive
        self._port: IListeningPort | None = None

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        assert self._port is not None, "not listening"
        return cast("IPv4Address | IPv6Address", self._port.getHost()).port

    def url(self) -> str:
        host, _ = split_host_port(self.listen)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def site(self) -> Site:
        root = _Root([
            (b"static", _Assets(str(STATIC))),
            (b"symbols", SymbolsResource(SymbolListing(self.clients.source),
                                         self.clients.default_symbol)),
            (b"ws", WebSocketResource(_SummaryStreamFactory(self.clients, self.keepalive))),
        ])
        return _WebSite(root)

    def startService(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self._port = self.reactor.listenTCP(
                # Site is a ServerFactory[_GenericHTTPChannelProtocol]; see metrics_http.py.
                port, self.site(), interface=host  # type: ignore[arg-type]
            )
        except CannotListenError as error:
            raise CannotListen(
                f"cannot serve the live view on {self.listen}: {error.socketError}"
            ) from None
        super().startService()
        self.log.info("live view at {url}", url=self.url())
        if not is_loopback(host):
            self.log.warn(
                "the live view on {listen} is reachable beyond this machine over plain HTTP "
                "(no TLS, no authentication); bind 127.0.0.1 unless a firewall or proxy "
                "guards the port",
                listen=self.listen,
            )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        port, self._port = self._port, None
        stopped = [succeed(None) if port is None else _stop_listening(port)]
        for client in list(self.clients.open):
            client.sendClose(STOPPING, "the daemon is stopping")
            stopped.append(client.closed)
        return DeferredList(stopped, consumeErrors=True)


def _stop_listening(port: IListeningPort) -> Deferred[None]:
    stopped = port.stopListening()  # a Deferred, or None when stopped at once
    return stopped if stopped is not None else succeed(None)
