"""Prometheus metrics over HTTP (GET /metrics), served by the reactor."""

from __future__ import annotations

from typing import cast

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request, Site

from aggregator.address import CannotListen, is_loopback, split_host_port
from aggregator.metrics import BOOK_STATE, BookStates
from aggregator.reactor import installed_reactor


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry, book_states: BookStates | None) -> None:
        super().__init__()
        self.registry = registry
        self.book_states = book_states

    def render_GET(self, request: Request) -> bytes:
        # Rendered on the reactor: a few milliseconds with 1,500 symbols
        # (the per-book family is pre-formatted, metrics.BookStates), less
        # than handing it to a thread would cost the loop.
        encoder, content_type = choose_encoder(request.getHeader("accept") or "")
        request.setHeader("content-type", content_type)
        text = encoder(self.registry)
        if self.book_states is None:
            return text
        openmetrics = content_type.startswith("application/openmetrics-text")
        states = self.book_states.render(openmetrics)
        if openmetrics and text.endswith(_EOF):
            return text[: -len(_EOF)] + states + _EOF
        return text + states


_EOF = b"# EOF\n"


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _MetricsSite(Site):
    noisy = False

    def logPrefix(self) -> str:
        return "metrics HTTP"

    def log(self, request: HTTPRequest) -> None:
        pass  # no access-log line per scrape


class MetricsServer(Service):
    """Listens in startService (twistd forks after makeService)."""

    log = Logger()

    def __init__(
        self,
        listen: str,
        reactor: IReactorTCP | None = None,
        registry: CollectorRegistry = REGISTRY,
        book_states: BookStates | None = BOOK_STATE,
    ) -> None:
        self.listen = listen
        self.reactor: IReactorTCP = reactor if reactor is not None else installed_reactor()
        self.registry = registry
        self.book_states = book_states
        self._port: IListeningPort | None = None

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        assert self._port is not None, "not listening"
        # A port listenTCP returned: its address is an IPv4Address or IPv6Address.
        return cast("IPv4Address | IPv6Address", self._port.getHost()).port

    def startService(self) -> None:
        host, port = split_host_port(self.listen)
        root = _Root()
        root.putChild(b"metrics", MetricsResource(self.registry, self.book_states))
        try:
            self._port = self.reactor.listenTCP(
                # Twisted's annotations: Site is a ServerFactory[_GenericHTTPChannelProtocol],
                # listenTCP asks for a ServerFactory[_ProtoWithFactory], and Factory's type
                # parameter is invariant.
                port, _MetricsSite(root), interface=host  # type: ignore[arg-type]
            )
        except CannotListenError as error:
            raise CannotListen(
                f"cannot serve metrics on {self.listen}: {error.socketError}"
            ) from None
        super().startService()
        self.log.info(
            "metrics on http://{listen}/metrics (port {port})", listen=self.listen, port=self.port
        )
        if not is_loopback(host):
            self.log.warn(
                "metrics on {listen} are reachable beyond this machine over plain HTTP "
                "(no TLS, no authentication); bind 127.0.0.1 unless a firewall or proxy "
                "guards the port",
                listen=self.listen,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self._port = self._port, None
        return maybeDeferred(_stop_listening, port) if port is not None else succeed(None)


def _stop_listening(port: IListeningPort) -> Deferred[None]:
    stopped = port.stopListening()  # a Deferred, or None when stopped at once
    return stopped if stopped is not None else succeed(None)
