"""FeedProtocol and Connection driven with a StringTransport and a Clock: the
websocket handshake, frames in and out, pacing and close, with no socket and
no monkeypatching (the Connection's connector is injected)."""

import base64
import hashlib

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txaio.testutil import replace_loop

from aggregator.exchanges.binance import SETTINGS
from aggregator.exchanges.connection import Connection
from aggregator.exchanges.websocket import FeedClientFactory, FeedProtocol

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Events:
    """ConnectionEvents recording what the Connection reports."""

    def __init__(self):
        self.opened, self.frames, self.lost, self.to_send = [], [], [], []

    def connection_opened(self, connection):
        self.opened.append(connection)

    def frame_received(self, connection, payload, arrival):
        self.frames.append((payload, arrival))

    def connection_lost(self, connection, reason):
        self.lost.append(reason)

    def connection_aged(self, connection):
        pass

    def connection_idle(self, connection):
        pass

    def next_frame(self, connection):
        return self.to_send.pop(0) if self.to_send else None

    def all_sent(self, connection):
        pass


def server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def unmask_client_frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        length = data[1] & 0x7F
        mask, payload = data[2:6], data[6 : 6 + length]
        frames.append(bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        data = data[6 + length :]
    return frames


def handshake(protocol: FeedProtocol, transport: StringTransport) -> None:
    request = transport.value().decode()
    key = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    transport.clear()
    protocol.dataReceived(
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())


def test_feed_protocol_on_a_string_transport_reports_to_its_connection():
    clock = Clock()
    clock.advance(1000.0)
    events = Events()
    made = []

    class Connector:
        """Builds the protocol by hand instead of connecting (what ClientService would do)."""

        def __init__(self, connection):
            self.connection = connection

        def startService(self):
            factory = FeedClientFactory(self.connection.url, self.connection, reactor=clock)
            made.append(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9)))

        def stopService(self):
            from twisted.internet.defer import succeed
            return succeed(None)

    with replace_loop(Clock()):  # Autobahn's own timers run on txaio's loop
        connection = Connection("binance connection #1", "ws://127.0.0.1:9/stream", SETTINGS,
                                events, clock, lambda attempt: 1.0, Connector)
        connection.start()
        (protocol,) = made
        transport = StringTransport()
        protocol.makeConnection(transport)
        assert transport.value().startswith(b"GET /stream HTTP/1.1\r\n")
        handshake(protocol, transport)
        assert events.opened == [connection] and connection.connected

        clock.advance(0.5)
        protocol.dataReceived(server_frame(b'{"result":null,"id":1}'))
        assert events.frames == [(b'{"result":null,"id":1}', 1000.5)]

        # Frames pulled from the events when a send slot is free, paced at 3/s.
        events.to_send = [{"id": n} for n in range(4)]
        connection.wake()
        for _ in range(20):
            clock.advance(0.1)
        sent = unmask_client_frames(transport.value())
        assert [orjson.loads(frame) for frame in sent] == [{"id": n} for n in range(4)]

        # A close frame from the server: the connection reports it once.
        protocol.dataReceived(server_frame(b"\x03\xe9bye", opcode=0x8))
        protocol.connectionLost(Failure(ConnectionDone()))
        assert len(events.lost) == 1 and "1001" in events.lost[0]
        assert not connection.connected


def test_a_message_is_handed_over_whole_without_autobahns_observer_futures():
    # FeedProtocol.onMessageEnd replaces Autobahn's, which also fires "message"
    # observers (a txaio future per message): nothing observes them here.
    received = []

    class Handler:
        def message_received(self, payload):
            received.append(payload)

    with replace_loop(Clock()):
        factory = FeedClientFactory("ws://127.0.0.1:9/stream", Handler(), reactor=Clock())
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        protocol.opened.addErrback(lambda failure: None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        handler = factory.handler
        handler.connection_opened = lambda protocol: None
        handshake(protocol, transport)

        def no_observers(*args, **kwargs):
            raise AssertionError("Autobahn's message observers were fired")

        protocol.fire = no_observers
        protocol.dataReceived(server_frame(b'{"a":1}'))
        # One message in two frames (FIN clear, then a continuation frame).
        protocol.dataReceived(bytes([0x01, 4]) + b'{"b"' + bytes([0x80, 3]) + b":2}")
        assert received == [b'{"a":1}', b'{"b":2}']
