"""The simulator's faults and enforced limits.

Timing is tested on a Clock (MemoryReactorClock + txaio.testutil.replace_loop, with the
websocket protocols driven over StringTransport); what clients see is tested on loopback with
plain Autobahn and treq clients written from PROTOCOLS.md only.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any, Iterator

import orjson
import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from txaio.testutil import replace_loop

from aggregator.simulator import SimulatorService
from aggregator.simulator.binance import DepthHub
from aggregator.simulator.bitstamp import ChannelHub
from aggregator.simulator.faults import BAD_FRAME_KINDS
from aggregator.simulator.venues import EXCHANGES
from aggregator.simulator.market import Book, Market
from aggregator.simulator.rest import RestGate, WeightLimiter
from aggregator.simulator.service import RANDOM_FAULTS, parse_fault_names
from tests.simclient import TIMEOUT, _reactor, connect, get, running, sleep, until



class FakeSocket:
    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def sendPreparedMessage(self, prepared: bytes) -> None:
        self.raw.append(prepared)

    def frames(self) -> list[Any]:
        out = []
        for raw in self.raw:
            try:
                out.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                out.append(raw)
        return out


# ------------------------------------------------------------------ market history


def test_market_as_of_and_consume_ids():
    clock = Clock()
    clock.advance(100)
    market = Market("binance", "x", clock.seconds, Book([("1", "1")], [("3", "1")]), 10, history=3)
    before = market.book.floats()
    clock.advance(1)
    market.apply([("1", "2"), ("2", "5")], [])  # ids 11-12
    clock.advance(1)
    market.apply([("2", "0")], [("3", "0"), ("4", "1")])  # 13-15
    assert market.consume_ids(4) == (16, 19)
    book, last_id, micro = market.as_of(1)
    assert book.floats() == ([(2.0, 5.0), (1.0, 2.0)], [(3.0, 1.0)]) and last_id == 12 and micro == 101_000_000
    book, last_id, micro = market.as_of(2)
    assert book.floats() == before and last_id == 10 and micro == 100_000_000
    assert market.as_of(50)[1] == 10  # clamped to what is remembered
    assert market.as_of(0)[1] == 19
    for _ in range(5):
        market.apply([("1", "9")], [])
    assert market.history_size == 3


# ------------------------------------------------------------------ hubs


def test_depth_hub_skip_and_bad_frames_in_conflated_mode():
    clock = Clock()
    market = Market("binance", "abc", clock.seconds, Book([("1.0", "1")], [("2.0", "1")]), 100)
    hub = DepthHub({"abc": market}, clock)
    sock = FakeSocket()
    hub.subscribe(sock, "abc@depth@100ms")
    hub.start()
    market.apply([("1.0", "2")], [])  # 101, pending
    assert hub.skip_ids("abc", 3) == (102, 104)  # the pending change goes out first
    market.apply([("1.0", "3")], [])  # 105
    clock.advance(0.1)
    assert [(f["data"]["U"], f["data"]["u"]) for f in sock.frames()] == [(101, 101), (105, 105)]

    sock.raw.clear()
    for kind in BAD_FRAME_KINDS:
        assert hub.send_bad_frame("abc", kind) == 1
    market.apply([("1.0", "4")], [])
    clock.advance(0.1)
    frames = sock.frames()
    assert isinstance(frames[0], bytes)  # malformed JSON: does not parse
    bad = {kind: f["data"] for kind, f in zip(BAD_FRAME_KINDS[1:], frames[1:])}
    assert bad["nan_price"]["b"] == [["NaN", "1.00000000"]] and bad["nan_price"]["U"] == 107
    assert bad["inf_price"]["b"][0][0] == "Infinity"
    assert float(bad["zero_price"]["b"][0][0]) == 0
    assert float(bad["negative_amount"]["b"][0][1]) < 0
    assert isinstance(bad["wrong_types"]["b"][0][0], list)
    assert bad["unknown_event"]["e"] != "depthUpdate" and "U" not in bad["unknown_event"]
    # Six corrupt frames used ids 106-111; unknown_event none; the next change is 112.
    assert [b["U"] for k, b in bad.items() if k != "unknown_event"] == [107, 108, 109, 110, 111]
    assert frames[-1]["data"]["U"] == 112
    with pytest.raises(ValueError):
        hub.send_bad_frame("abc", "nope")
    hub.stop()
    assert clock.getDelayedCalls() == []


def test_channel_hub_lose_count_and_bad_frames():
    clock = Clock()
    clock.advance(1000)
    market = Market("bitstamp", "ethusd", clock.seconds, Book([("10.00", "1.0")], [("11.00", "1.0")]), 0)
    hub = ChannelHub({"ethusd": market})
    diff, full = FakeSocket(), FakeSocket()
    hub.subscribe(diff, "diff_order_book_ethusd")
    hub.subscribe(full, "order_book_ethusd")
    hub.start()
    hub.lose_next("ethusd", 2)
    for amount in ("2.0", "3.0", "4.0"):
        clock.advance(0.01)
        market.apply([("10.00", amount)], [])
    assert [f["data"]["bids"] for f in diff.frames()] == [[["10.00", "4.0"]]]
    assert len(full.frames()) == 3  # order_book_ is never lost
    assert hub.subscribed_symbols() == ["ethusd"]
    assert hub.send_bad_frame("ethusd", "negative_amount") == 2
    bad = diff.frames()[-1]["data"]
    assert bad["bids"] == [["10.00", "-4.0"]]
    assert int(bad["microtimestamp"]) > int(diff.frames()[-2]["data"]["microtimestamp"])
    assert hub.send_bad_frame("ethusd", "wrong_types") == 2
    assert isinstance(diff.frames()[-1]["data"]["microtimestamp"], list)
    hub.send_bad_frame("ethusd", "unknown_event")
    assert diff.frames()[-1]["event"] not in ("data", "bts:error")
    hub.stop()


# ------------------------------------------------------------------ REST limits and faults


def test_weight_limiter_429_then_418_and_windows():
    limiter = WeightLimiter(100, 60.0, ban_seconds=120.0)
    assert limiter.admit(10.0, 50) == (200, 0.0, None)
    assert limiter.admit(11.0, 50) == (200, 0.0, None)
    assert limiter.used(11.0) == 100
    assert limiter.admit(20.0, 5) == (429, 40.0, "rest_over_budget")  # Retry-After: end of minute
    assert limiter.used(20.0) == 100  # refused requests cost nothing
    status, retry, kind = limiter.admit(30.0, 5)  # before Retry-After elapsed: banned
    assert (status, retry, kind) == (418, 120.0, "rest_ignored_retry_after")
    assert limiter.admit(100.0, 5)[::2] == (418, "rest_banned")
    assert limiter.admit(150.0, 5) == (200, 0.0, None)  # ban over; a new minute
    assert limiter.used(150.0) == 5
    # Obeying Retry-After: no ban.
    limiter = WeightLimiter(10, 60.0, ban_seconds=120.0)
    limiter.admit(0.0, 10)
    assert limiter.admit(1.0, 1)[0] == 429
    assert limiter.admit(60.0, 1)[0] == 200
    # Bitstamp style: no bans, 429 until the window ends.
    limiter = WeightLimiter(1, 600.0, ban_seconds=None)
    limiter.admit(0.0, 1)
    assert limiter.admit(1.0, 1)[:2] == (429, 599.0)
    assert limiter.admit(2.0, 1)[:2] == (429, 598.0)


class _Inner:
    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok":1}'


def _request(path: bytes = b"/api/v3/depth", query: bytes = b"symbol=X&limit=1000") -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.path = path
    request.uri = path + b"?" + query
    request.args = {k.encode(): [v.encode()] for k, v in (p.split("=") for p in query.decode().split("&"))}
    return request


def test_rest_gate_forced_statuses_slow_responses_and_log():
    clock = Clock()
    violations: list = []
    gate = RestGate(
        "binance",
        _Inner(),  # type: ignore[arg-type]
        clock,
        WeightLimiter(120, 60.0, 30.0),
        weigher=lambda path, args: 50,
        used_header=b"x-mbx-used-weight-1m",
        on_violation=violations.append,
    )
    request = _request()
    assert gate.render(request) == b'{"ok":1}'
    assert request.responseHeaders.getRawHeaders(b"x-mbx-used-weight-1m") == [b"50"]
    gate.force([503, 429], retry_after=5)
    request = _request()
    gate.render(request)
    assert request.responseCode == 503 and request.responseHeaders.getRawHeaders(b"retry-after") == [b"5"]
    request = _request()
    gate.render(request)
    assert request.responseCode == 429
    clock.advance(2)
    request = _request()
    gate.render(request)  # inside the forced 429's Retry-After: banned for 30 s
    assert request.responseCode == 418 and request.responseHeaders.getRawHeaders(b"retry-after") == [b"30"]
    clock.advance(30)
    assert gate.render(_request()) == b'{"ok":1}'
    # Budget: 120 per minute at 50 each; the minute started at 0 and 100 are used.
    request = _request()
    gate.render(request)
    assert request.responseCode == 429 and request.responseHeaders.getRawHeaders(b"retry-after") == [b"28"]
    assert [v.kind for v in violations] == ["rest_ignored_retry_after", "rest_over_budget"]
    log = gate.log_records
    assert [r.status for r in log] == [200, 503, 429, 418, 200, 429]
    assert [r.used for r in log] == [50, 50, 50, 50, 100, 100]
    assert log[0].path == "/api/v3/depth" and log[0].query == "symbol=X&limit=1000" and log[0].weight == 50

    # Slow REST: held back on the clock, content as of the request; only `count` of them.
    clock.advance(60)
    gate.slow(2.5, count=1)
    request = _request()
    assert gate.render(request) is NOT_DONE_YET
    clock.advance(2.4)
    assert not request.finished
    clock.advance(0.1)
    assert request.finished and b"".join(request.written) == b'{"ok":1}'
    assert gate.log_records[-1].delay == 2.5
    assert gate.render(_request()) == b'{"ok":1}'  # count used up
    # A client that goes away: the held response is cancelled.
    gate.slow(1.0)
    request = _request()
    gate.render(request)
    request.processingFailed(Exception("gone"))  # fires notifyFinish's errback
    assert clock.getDelayedCalls() == []
    gate.slow(0)
    clock.advance(60)  # a new minute's budget
    # Forced faults can be limited to a path.
    gate.force([500], path="/api/v3/exchangeInfo")
    assert gate.render(_request()) == b'{"ok":1}'
    request = _request(b"/api/v3/exchangeInfo", b"x=1")
    gate.render(request)
    assert request.responseCode == 500
    with pytest.raises(ValueError):
        gate.force([99])


# ------------------------------------------------------------------ websocket over StringTransport


def _client_frame(opcode: int, payload: bytes = b"") -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    header = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    return header + mask + masked


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        opcode, n, i = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, i = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, i = struct.unpack("!Q", data[2:10])[0], 10
        out.append((opcode, data[i : i + n]))
        data = data[i + n :]
    return out


class _Transport(StringTransport):
    def unregisterProducer(self) -> None:
        # Like a TCP transport: fine without a registered producer (Autobahn's dropConnection).
        if self.producer is not None:
            super().unregisterProducer()


class _Conn:
    """A server protocol of the simulator on a StringTransport, after the opening handshake."""

    def __init__(self, factory: Any, path: bytes) -> None:
        self.transport = _Transport()
        self.proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(
            b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert self.transport.value().startswith(b"HTTP/1.1 101")
        self.transport.clear()

    def send(self, opcode: int, payload: bytes = b"") -> None:
        self.proto.dataReceived(_client_frame(opcode, payload))

    def received(self) -> list[tuple[int, bytes]]:
        frames = _server_frames(self.transport.value())
        self.transport.clear()
        return frames

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


@contextlib.contextmanager
def clocked(**kwargs: Any) -> Iterator[tuple[SimulatorService, MemoryReactorClock]]:
    """A started simulator on a MemoryReactorClock that Autobahn's timers also use."""
    with replace_loop(MemoryReactorClock()) as clock:
        sim = SimulatorService(reactor=clock, **kwargs)
        sim.startService()
        try:
            yield sim, clock
        finally:
            sim.stopService()


def _close(frames: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    for opcode, payload in frames:
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
    return None


def test_binance_message_rate_limit_counts_control_frames():
    with clocked(source="synthetic") as (sim, clock):
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=ethbtc@depth@100ms")
        # 4 per second (PROTOCOLS' advice) is fine, pings included, also for a long time.
        for _ in range(12):
            conn.send(9, b"p")
            clock.advance(0.25)
        assert _close(conn.received()) is None and sim.violations == []
        clock.advance(1.0)
        # A sixth frame within one second: closed with 1008.
        conn.send(1, orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 1}))
        for opcode in (9, 10, 9, 10):
            conn.send(opcode, b"")
        assert _close(conn.received()) is None
        conn.send(10, b"")
        assert _close(conn.received()) == (1008, "Too many messages")
        assert [(v.exchange, v.kind) for v in sim.violations] == [("binance", "too_many_messages")]
        conn.lose()


def test_binance_stream_limit_per_connection():
    with clocked(source="synthetic") as (sim, clock):
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=ethbtc@depth@100ms")
        names = [f"x{i}usdt@depth" for i in range(1000)]
        conn.send(1, orjson.dumps({"method": "SUBSCRIBE", "params": names, "id": 1}))
        clock.advance(1)
        more = [f"y{i}usdt@depth" for i in range(24)]  # 1 + 1000 + 24 = 1025
        conn.send(1, orjson.dumps({"method": "SUBSCRIBE", "params": more, "id": 2}))
        replies = [orjson.loads(p) for op, p in conn.received() if op == 1 and b'"id"' in p]
        assert replies == [
            {"result": None, "id": 1},
            {"error": {"code": 4, "msg": "Too many subscriptions"}, "id": 2},
        ]
        assert [v.kind for v in sim.violations] == ["too_many_streams"]
        clock.advance(1)
        conn.send(1, orjson.dumps({"method": "SUBSCRIBE", "params": more[:23], "id": 3}))  # 1024: fine
        assert {"result": None, "id": 3} in [orjson.loads(p) for op, p in conn.received() if op == 1]
        conn.lose()


def test_binance_pong_timeout_closes_with_1008():
    with clocked(source="synthetic") as (sim, clock):
        sim.pause()  # only keepalive matters here
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=ethbtc@depth@100ms")
        pinged = []
        for _ in range(25):
            clock.advance(1.0)
            pinged += [p for op, p in conn.received() if op == 9]
        assert len(pinged) == 1  # every 20 s (Autobahn's timers run in 0.2 s buckets)
        conn.send(10, pinged[0])  # answered: no close
        for _ in range(100):  # the next ping 20 s after that pong, unanswered: 60 s later, 1008
            clock.advance(1.0)
            frames = conn.received()
            pings = [p for op, p in frames if op == 9]
            assert _close(frames) is None or _close(frames) == (1008, "Pong timeout")
            if _close(frames):
                break
        else:
            raise AssertionError("no pong timeout")
        assert sim.violations[-1].kind == "pong_timeout"
        assert pings == []  # the close was the only frame
        conn.lose()


def test_binance_24h_limit_with_a_well_behaved_client():
    with clocked(source="recorded", connection_lifetime=100.0) as (sim, clock):
        sim.pause()
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=nknusdt@depth@100ms")
        closed = None
        for _ in range(101):
            clock.advance(1.0)
            frames = conn.received()
            for opcode, payload in frames:
                if opcode == 9:
                    conn.send(10, payload)
            closed = closed or _close(frames)
        assert closed == (1001, "24h connection limit")
        assert sim.violations == []
        conn.lose()


def test_stall_for_a_duration_on_the_clock():
    with clocked(source="synthetic", speed=5.0) as (sim, clock):
        old = _Conn(sim._venues["bitstamp"].ws, b"/")
        old.send(1, orjson.dumps({"event": "bts:subscribe", "data": {"channel": "order_book_ethbtc"}}))
        clock.advance(0.5)
        assert any(op == 1 and b'"event":"data"' in p for op, p in old.received())
        assert sim.stall("bitstamp", duration=10.0) == 1 and sim.stalled("bitstamp") == 1
        assert old.transport.producerState == "paused"  # not reading: heartbeats wait
        new = _Conn(sim._venues["bitstamp"].ws, b"/")  # a fresh connection is served
        new.send(1, orjson.dumps({"event": "bts:heartbeat"}))
        assert orjson.loads(new.received()[0][1])["event"] == "bts:heartbeat"
        clock.advance(9.9)
        assert old.received() == [] and sim.stalled("bitstamp") == 1
        clock.advance(0.2)
        assert sim.stalled("bitstamp") == 0 and old.transport.producerState == "producing"
        # The backlog is read when the stall ends; the answer comes then.
        old.send(1, orjson.dumps({"event": "bts:heartbeat"}))
        clock.advance(0.5)
        frames = [orjson.loads(p) for op, p in old.received()]
        assert {"event": "bts:heartbeat", "channel": "", "data": {"status": "success"}} in frames
        assert any(f["event"] == "data" for f in frames)
        old.lose()
        new.lose()


def test_binance_stall_suspends_pings_and_burst_after_is_not_a_violation():
    with clocked(source="synthetic") as (sim, clock):
        conn = _Conn(sim._venues["binance"].ws, b"/stream?streams=ethbtc@depth@100ms")
        clock.advance(1)
        conn.received()
        sim.pause()  # only keepalive matters here
        sim.stall("binance")
        for _ in range(120):  # two minutes: no ping, no pong timeout, nothing
            clock.advance(1)
        assert conn.received() == []
        assert sim.unstall() == 1
        for _ in range(8):  # e.g. pings the client queued during the stall
            conn.send(9, b"q")
        frames = conn.received()
        assert [p for op, p in frames if op == 10] == [b"q"] * 8 and _close(frames) is None
        assert sim.violations == []
        clock.advance(21)
        assert any(op == 9 for op, _ in conn.received())  # the keepalive is back
        conn.lose()


# ------------------------------------------------------------------ random faults, CLI names


def test_random_faults_on_the_clock():
    assert parse_fault_names("random") == RANDOM_FAULTS
    assert parse_fault_names("none") == () and parse_fault_names(None) == ()
    assert parse_fault_names("stall, drop") == ("stall", "drop")
    with pytest.raises(ValueError):
        parse_fault_names("stall,meteor")

    def run() -> list[str]:
        with clocked(source="synthetic", faults="random", fault_interval=2.0, seed=3) as (sim, clock):
            sim.pause()
            for _ in range(20):
                clock.advance(1.0)
            return sim.faults_injected

    injected = run()
    assert len(injected) == 10 and injected == run()  # seeded
    assert len({line.split()[0] for line in injected}) > 3

    with clocked(source="synthetic") as (sim, clock):
        assert "stall" in sim.inject_random_fault(["stall"])
        clock.advance(20)
        assert sim.faults_injected and sim.stalled("binance") == 0


def test_fault_argument_checks():
    sim = SimulatorService(reactor=MemoryReactorClock(), source="synthetic")
    with pytest.raises(KeyError):
        sim.skip_updates("binance", "foobar")
    with pytest.raises(ValueError):
        sim.stall("nosuch")
    with pytest.raises(ValueError):
        sim.send_bad_frame("binance", "ethbtc", "gibberish")
    with pytest.raises(ValueError):
        sim.close_clients("binance", 1005)
    with pytest.raises(ValueError):
        sim.stale_snapshot("bitstamp", "ethbtc", 0)
    with pytest.raises(ValueError):
        sim.slow_rest("binance", -1)


# ------------------------------------------------------------------ loopback


@pytest_twisted.ensureDeferred
async def test_loopback_drop_skip_bad_frames_and_close_codes():
    async with running(source="synthetic", speed=4.0) as sim:
        binance = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethusdt@depth@100ms")
        bitstamp = await connect(sim.urls["bitstamp_ws_url"])
        bitstamp.send({"event": "bts:subscribe", "data": {"channel": "diff_order_book_ethusdt"}})
        # Skipped ids: U jumps by exactly the count.
        last = (await binance.next_data())["data"]["u"]
        first, end = sim.skip_updates("binance", "ethusdt", 7)
        assert first > last
        while (data := (await binance.next_data())["data"])["u"] < first:
            last = data["u"]  # sent before the skip
        assert data["U"] == end + 1 and data["U"] - last - 1 >= 7
        # Bad frames reach the client as sent, back to back.
        for kind in BAD_FRAME_KINDS:
            sim.send_bad_frame("binance", "ethusdt", kind)
        while True:
            raw = await binance.next_raw()
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                break  # the first one, malformed_json
        raws = [raw] + [await binance.next_raw() for _ in BAD_FRAME_KINDS[1:]]
        assert orjson.loads(raws[1])["data"]["b"][0][0] == "NaN"
        assert orjson.loads(raws[-1])["data"]["e"] == "depthUpdateV9"
        await bitstamp.next_data()  # subscribed
        sim.send_bad_frame("bitstamp", "ethusdt", "nan_price")
        while [p for p, _ in (await bitstamp.next_data())["data"]["bids"]] != ["NaN"]:
            pass
        # Drop one exchange only: the other stays connected.
        await sim.drop_clients("binance")
        await binance.closed.addTimeout(TIMEOUT, _reactor())
        assert bitstamp.closed.called is False and sim.connections("bitstamp") == 1
        # Close codes as Binance sends them.
        binance = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethusdt@depth@100ms")
        assert sim.close_clients("binance", 1008, "Pong timeout") == 1
        await binance.closed.addTimeout(TIMEOUT, _reactor())
        assert (binance.close_code, binance.close_reason) == (1008, "Pong timeout")
        binance = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethusdt@depth@100ms")
        sim.close_clients("binance", 1001, "24h connection limit")
        await binance.closed.addTimeout(TIMEOUT, _reactor())
        assert (binance.close_code, binance.close_reason) == (1001, "24h connection limit")
        await bitstamp.close()


@pytest_twisted.ensureDeferred
async def test_loopback_stall_and_too_many_messages():
    async with running(source="synthetic", speed=4.0) as sim:
        url = sim.urls["binance_ws_url"] + "/stream?streams=btcusdt@depth@100ms"
        old = await connect(url)
        last = (await old.next_data())["data"]["u"]
        assert sim.stall("binance", duration=0.5) == 1
        stalled_at = sim.market("binance", "btcusdt").last_update_id
        old.sendPing(b"alive?")
        new = await connect(url)  # served while the old one is stalled
        await new.next_data()
        await sleep(0.3)
        assert old.pongs == [] and not old.closed.called
        # Nothing but what was already in flight when the stall began.
        assert all(m["data"]["u"] <= stalled_at for m in old.pending())
        await until(lambda: old.pongs == [b"alive?"])  # answered once the stall ended (0.5 s)
        while (data := (await old.next_data())["data"])["U"] <= stalled_at:
            last = data["u"]
        assert data["U"] > last + 1  # what was produced meanwhile is lost: a gap
        # Six client frames within a second: Binance closes with 1008.
        for _ in range(6):
            new.sendPing(b"")
        await new.closed.addTimeout(TIMEOUT, _reactor())
        assert (new.close_code, new.close_reason) == (1008, "Too many messages")
        assert [v.kind for v in sim.violations] == ["too_many_messages"]
        await old.close()


@pytest_twisted.ensureDeferred
async def test_loopback_request_reconnect_make_before_break():
    async with running(source="synthetic", speed=4.0) as sim:
        old = await connect(sim.urls["bitstamp_ws_url"])
        old.send({"event": "bts:subscribe", "data": {"channel": "order_book_ltcbtc"}})
        await old.next_data()
        assert sim.request_reconnect(close_after=0.4) == 1
        while (message := await old.next())["event"] == "data":
            pass
        assert message == {"event": "bts:request_reconnect", "channel": "", "data": ""}
        # The new connection is opened while the old one is still open: both get data.
        new = await connect(sim.urls["bitstamp_ws_url"])
        new.send({"event": "bts:subscribe", "data": {"channel": "order_book_ltcbtc"}})
        await new.next_data()
        old.pending()
        await old.next_data()
        await old.closed.addTimeout(TIMEOUT, _reactor())
        assert old.close_code == 1001
        assert not new.closed.called
        await new.close()


@pytest_twisted.ensureDeferred
async def test_loopback_rest_limits_faults_and_stale_snapshot():
    if time.time() % 60 > 57:  # the weight budget is per clock minute: start inside one
        await sleep(60 - time.time() % 60 + 0.05)
    async with running(source="synthetic", speed=4.0, rest_weight_limit=120, rest_ban_seconds=30) as sim:
        base = sim.urls["binance_rest_url"]
        depth = base + "/api/v3/depth?symbol=ETHBTC&limit=1000"  # weight 50
        code, headers, body = await get(base + "/api/v3/exchangeInfo")
        limits = orjson.loads(body)["rateLimits"]
        assert limits[0]["rateLimitType"] == "REQUEST_WEIGHT" and limits[0]["limit"] == 120
        assert headers.getRawHeaders("x-mbx-used-weight-1m") == ["20"]
        codes = []
        for _ in range(4):
            code, headers, body = await get(depth)
            codes.append((code, headers.getRawHeaders("retry-after")))
        assert [c for c, _ in codes] == [200, 200, 429, 418]
        assert orjson.loads(body)["code"] == -1003 and codes[3][1] == ["30"]
        log = sim.rest_log("binance")
        assert [(r.weight, r.status) for r in log] == [(20, 200), (50, 200), (50, 200), (50, 429), (50, 418)]
        assert max(r.used for r in log) <= 120
        assert [v.kind for v in sim.violations] == ["rest_over_budget", "rest_ignored_retry_after"]

        # Bitstamp: forced statuses, a dropped connection, a slow and a stale snapshot.
        base = sim.urls["bitstamp_rest_url"]
        sim.rest_fault("bitstamp", [503, "drop"], retry_after=2)
        code, headers, _ = await get(base + "/api/v2/trading-pairs-info/")
        assert code == 503 and headers.getRawHeaders("retry-after") == ["2"]
        with pytest.raises(Exception):
            await get(base + "/api/v2/trading-pairs-info/")
        market = sim.market("bitstamp", "ethbtc")
        await until(lambda: market.history_size >= 6)
        sim.pause()
        expected, _, micro = market.as_of(5)
        sim.stale_snapshot("bitstamp", "ethbtc", 5)
        sim.slow_rest("bitstamp", 0.3, count=1)
        started = time.monotonic()
        code, _, body = await get(base + "/api/v2/order_book/ethbtc/")
        assert time.monotonic() - started >= 0.29
        snap = orjson.loads(body)
        assert int(snap["microtimestamp"]) == micro < market.last_microtimestamp
        assert [(float(p), float(a)) for p, a in snap["bids"]] == expected.floats()[0]
        code, _, body = await get(base + "/api/v2/order_book/ethbtc/")  # the next one is fresh
        assert int(orjson.loads(body)["microtimestamp"]) == market.last_microtimestamp
        assert [r.status for r in sim.rest_log("bitstamp")] == [503, 0, 200, 200]


@pytest_twisted.ensureDeferred
async def test_loopback_control_endpoint():
    async with running(source="synthetic", speed=4.0) as sim:
        base = sim.urls["bitstamp_rest_url"]
        client = await connect(sim.urls["binance_ws_url"] + "/stream?streams=ethbtc@depth@100ms")
        last = (await client.next_data())["data"]["u"]
        code, _, body = await get(base + "/_sim/fault/skip_updates?exchange=binance&symbol=ethbtc&count=3", "POST")
        reply = orjson.loads(body)
        assert code == 200 and reply["ok"] and reply["result"][0] > last
        while (data := (await client.next_data())["data"])["u"] < reply["result"][0]:
            pass
        assert data["U"] == reply["result"][1] + 1
        code, _, body = await get(sim.urls["binance_rest_url"] + "/_sim/fault/close?exchange=binance&code=1008&reason=Pong%20timeout", "POST")
        assert code == 200 and orjson.loads(body)["result"] == 1
        await client.closed.addTimeout(TIMEOUT, _reactor())
        assert client.close_reason == "Pong timeout"
        for path, method, status in (
            ("/_sim/fault/stall?exchange=nowhere", "POST", 400),
            ("/_sim/fault/skip_updates?exchange=binance", "POST", 400),
            ("/_sim/fault/meteor", "POST", 404),
            ("/_sim/fault/stall?exchange=binance", "GET", 405),
            ("/_sim/fault/rest_fault?exchange=binance&statuses=429,418&retry_after=1", "POST", 200),
            ("/_sim/fault/random?names=slow_rest", "POST", 200),
        ):
            code, _, body = await get(base + path, method)
            assert code == status, (path, body)
        code, _, body = await get(base + "/_sim/status")
        status = orjson.loads(body)
        # Every venue is listed; these two are the ones this test knows.
        assert {e: status["symbols"][e] for e in ("binance", "bitstamp")} == {"binance": 5, "bitstamp": 6}
        assert set(status["symbols"]) == set(EXCHANGES) and status["faults_injected"] == 1
        code, _, body = await get(base + "/_sim/rest_log?exchange=bitstamp")
        assert code == 200 and orjson.loads(body) == []  # control requests are not logged
        sim.slow_rest("bitstamp", 0)
