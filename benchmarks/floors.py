"""The floors every timing is compared with, measured in the same run on the same CPU as
the daemon:

- ingest floor: a bare Autobahn websocket client (on Twisted's asyncio reactor, as the
  daemon) that only receives and orjson-decodes Binance-shaped diff frames from the
  scale generator, sent by a "blaster" that writes pre-framed frames as fast as the socket
  takes them (the simulator itself cannot send as fast as a bare client receives);
- whole-market floor: the same client subscribed to the simulator's whole market (every
  Binance diff stream, every Bitstamp order_book_ channel) at the daemon's input rate;
- fan-out floor: a bare grpc.aio server (plain asyncio) whose BookSummary handler yields one
  pre-serialized Summary of the daemon's size in a loop, to the same client driver.

    python -m benchmarks.floors blaster --symbols N --messages M
    python -m benchmarks.floors ws-client --url ws://127.0.0.1:P --warmup 1 --duration 5
    python -m benchmarks.floors ws-client --connections FILE.json --warmup 2 --duration 10
    python -m benchmarks.floors grpc-server --port P
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time
from typing import Any

from aggregator.simulator.wsserver import ws_frame
from benchmarks import use_uvloop


# -- blaster: pre-framed frames as fast as the socket takes them ---------------------------


class _Blast(asyncio.Protocol):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""
        self.open = False
        self.paused = False
        self.index = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def data_received(self, data: bytes) -> None:
        if self.open:
            return  # client frames (pings, close) are ignored: this is a firehose
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        key = ""
        for line in self.buffer.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip().decode()
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        self.open = True
        self.fill()

    def fill(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(self.chunks[self.index])
            self.index = (self.index + 1) % len(self.chunks)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.fill()


async def _blaster(symbols: int, messages: int) -> None:
    from benchmarks.bookpath import synthetic_sequence

    frames = [ws_frame(f) for f in synthetic_sequence(symbols, messages).frames]
    chunks = [b"".join(frames[i : i + 512]) for i in range(0, len(frames), 512)]
    size = sum(len(f) for f in frames) / len(frames)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Blast(chunks), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"url": f"ws://127.0.0.1:{port}", "frame_bytes": size}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:  # until told to quit or the parent goes away
        line = await reader.readline()
        if not line or b"quit" in line:
            break
    server.close()


# -- the bare Autobahn client ---------------------------------------------------------------


def _ws_client(connections: list[tuple[str, list[str]]], warmup: float, duration: float) -> dict:
    """Open each (url, messages) connection, send its messages (subscriptions) once open,
    and count and decode what arrives on all of them; measure after `warmup`."""
    from aggregator.reactor import install_asyncio_reactor

    install_asyncio_reactor()
    import orjson
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
    from twisted.internet import reactor

    result: dict[str, Any] = {}
    count = [0]
    loads = orjson.loads
    opened: list[WebSocketClientProtocol] = []
    mark: dict[str, float] = {}

    def start() -> None:
        mark.update(c0=count[0], t0=time.perf_counter(), cpu0=time.process_time())
        reactor.callLater(duration, stop)

    def stop() -> None:
        elapsed = time.perf_counter() - mark["t0"]
        result["msgs_per_s"] = (count[0] - mark["c0"]) / elapsed
        result["cpu"] = (time.process_time() - mark["cpu0"]) / elapsed
        result["connections"] = len(opened)
        for protocol in opened:
            protocol.dropConnection(abort=True)
        reactor.stop()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            opened.append(self)
            for message in self.factory.messages:
                self.sendMessage(message.encode())
            if len(opened) == len(connections):
                reactor.callLater(warmup, start)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            loads(payload)
            count[0] += 1

    for url, messages in connections:
        factory = WebSocketClientFactory(url)
        factory.protocol = Client
        factory.messages = messages
        # As the daemon's feed: no size limits.
        # As the daemon's client (aggregator/exchanges/websocket.py): orjson checks UTF-8.
        factory.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0, utf8validateIncoming=False)
        connectWS(factory)
    reactor.callLater(warmup + duration + 30.0, reactor.stop)  # bounded whatever happens
    reactor.run()
    return result


# -- the bare grpc.aio server ----------------------------------------------------------------


def floor_summary() -> bytes:
    """A Summary as the daemon serializes it: 10 + 10 levels from two exchanges, their
    states and a timestamp (the daemon's own serializer)."""
    from aggregator.book import BookState
    from aggregator.merger import serialize_summary

    bids = [("binance" if i % 2 else "bitstamp", 27000.0 - i * 0.37, 0.5 + i * 0.731) for i in range(10)]
    asks = [("bitstamp" if i % 2 else "binance", 27001.1 + i * 0.41, 0.9 + i * 0.577) for i in range(10)]
    states = [("binance", BookState.LIVE, "in sync"), ("bitstamp", BookState.LIVE, "in sync")]
    return serialize_summary(bids, asks, states, time.time_ns() // 1000)


async def _grpc_server(port: int) -> None:
    import grpc

    summary = floor_summary()

    async def book_summary(request: bytes, context: Any) -> Any:
        while True:
            yield summary

    handler = grpc.method_handlers_generic_handler(
        "orderbook.Aggregator",
        {
            "BookSummary": grpc.unary_stream_rpc_method_handler(
                book_summary, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=5000)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"port": bound, "summary_bytes": len(summary)}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or b"quit" in line:
            break
    await server.stop(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors")
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("blaster")
    b.add_argument("--symbols", type=int, default=200)
    b.add_argument("--messages", type=int, default=20_000)
    c = sub.add_parser("ws-client")
    c.add_argument("--url", help="one connection, nothing sent (a blaster's)")
    c.add_argument("--connections", type=argparse.FileType(),
                   help='JSON [[url, [message, ...]], ...]: connections and the subscriptions each sends')
    c.add_argument("--warmup", type=float, default=1.0)
    c.add_argument("--duration", type=float, default=5.0)
    g = sub.add_parser("grpc-server")
    g.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    use_uvloop()  # the daemon's loop (also under Twisted's asyncio reactor, in ws-client)
    if args.what == "blaster":
        asyncio.run(_blaster(args.symbols, args.messages))
    elif args.what == "ws-client":
        connections = json.load(args.connections) if args.connections else [(args.url, [])]
        print(json.dumps(_ws_client(connections, args.warmup, args.duration)), flush=True)
    else:
        asyncio.run(_grpc_server(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
