"""Binance depth streams: who is subscribed to which stream, and the frames each one gets.

Normally the changes of a symbol are conflated per stream cadence and flushed as one
depthUpdate whose U..u covers exactly the update ids applied since the previous flush. In batch
mode (the scale source) every change event is its own frame, written at the end of the reactor
tick that produced it, and carries the simulator's send time (wire.SEND_TIME_FIELD).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..clock import Clock, looping_call
from ..faults import BAD_FRAME_KINDS
from ..market import Level, Market, Update
from ..wsserver import ws_frame
from .wire import INTERVALS, bad_frame, depth_update, parse_stream


class _Pending:
    """Changes of one stream since its last flush: latest level per price, and the id span."""

    __slots__ = ("symbol", "interval", "first_id", "last_id", "bids", "asks")

    def __init__(self, symbol: str, interval: float) -> None:
        self.symbol = symbol
        self.interval = interval
        self.first_id: int | None = None
        self.last_id = 0
        self.bids: dict[float, Level] = {}
        self.asks: dict[float, Level] = {}

    def add(self, update: Update) -> None:
        if self.first_id is None:
            self.first_id = update.first_id
        self.last_id = update.last_id
        for p, a in update.bids:
            self.bids[float(p)] = (p, a)
        for p, a in update.asks:
            self.asks[float(p)] = (p, a)

    def take_frame(self, stream: str, event_ms: int) -> bytes | None:
        if self.first_id is None:
            return None
        frame = depth_update(
            stream,
            self.symbol,
            event_ms,
            self.first_id,
            self.last_id,
            [self.bids[k] for k in sorted(self.bids, reverse=True)],
            [self.asks[k] for k in sorted(self.asks)],
        )
        self.first_id = None
        self.bids = {}
        self.asks = {}
        return frame


class DepthHub:
    """Who is subscribed to which depth stream, and the frames each stream gets.

    A socket is anything with `sendPreparedMessage(prepared)` (conflated mode) or
    `write_frames(list_of_frames)` (batch mode); `prepare` turns a frame into what
    sendPreparedMessage takes (Autobahn prepares a frame once for all sockets of a stream).

    Conflated mode (default): changes are accumulated per stream and flushed on the stream's
    cadence (100 ms or 1000 ms). Batch mode: each change event is one frame, with the
    simulator's send time; frames are written at the end of the reactor tick (`end_tick`,
    called by the source after a batch of changes, or scheduled automatically), each socket's
    frames in one write.
    """

    log = Logger()

    def __init__(
        self,
        markets: Mapping[str, Market],
        clock: Clock,
        prepare: Callable[[bytes], Any] = lambda frame: frame,
        batch: bool = False,
        send_time: Callable[[], float] = time.time,
    ):
        self._markets = markets
        self._clock = clock
        self._prepare = prepare
        self.batch = batch
        self._send_time = send_time
        self._subs: dict[str, dict[Any, None]] = {}  # stream -> sockets (ordered set)
        self._pending: dict[str, _Pending] = {}  # subscribed streams of served symbols
        self._streams_of: dict[str, list[str]] = {}  # symbol -> its entries of _pending
        self._loops: list[LoopingCall] = []
        self._lose: set[str] = set()  # streams whose next frame is to be lost (fault)
        self._queue: list[Any] = []  # batch mode: Update or (stream, symbol, frame), in order
        self._flush_call: Any = None
        self.frames_sent = 0
        self.frames_by_symbol: Counter[str] = Counter()
        # Called with (symbol, frame) for every frame built for a stream; for benchmarks.
        self.frame_listeners: list[Callable[[str, bytes], None]] = []

    def subscribers(self, stream: str) -> int:
        return len(self._subs.get(stream, ()))

    def subscribed_symbols(self) -> list[str]:
        """Served symbols that have at least one subscribed stream."""
        return sorted(symbol for symbol, streams in self._streams_of.items() if streams)

    def subscribe(self, socket: Any, stream: str) -> None:
        parsed = parse_stream(stream)
        if parsed is None:
            raise ValueError(f"invalid stream {stream!r}")
        self._subs.setdefault(stream, {})[socket] = None
        symbol, interval = parsed
        # Well-formed names of unknown symbols are accepted and never get data, like Binance.
        if symbol in self._markets and stream not in self._pending:
            self._pending[stream] = _Pending(symbol, interval)
            self._streams_of.setdefault(symbol, []).append(stream)

    def unsubscribe(self, socket: Any, stream: str) -> None:
        sockets = self._subs.get(stream)
        if sockets is None:
            return
        sockets.pop(socket, None)
        if not sockets:
            del self._subs[stream]
            self._lose.discard(stream)
            pending = self._pending.pop(stream, None)
            if pending is not None:
                self._streams_of[pending.symbol].remove(stream)

    def drop(self, socket: Any, streams: Iterable[str]) -> None:
        for stream in list(streams):
            self.unsubscribe(socket, stream)

    # ------------------------------------------------------------ faults

    def lose_next(self, symbol: str) -> None:
        """Fault: the next frame of each current stream of `symbol` is built but not sent, so
        clients see U jump past their last u (a lost message: they must resync)."""
        self._lose.update(self._streams_of.get(symbol, ()))

    def skip_ids(self, symbol: str, count: int) -> tuple[int, int]:
        """Fault: `count` update ids of `symbol` are used up by changes nobody will ever see,
        so the next frame's U is past the last u + 1. The true book is unaffected, so a
        resync (new snapshot) gives a correct book. Returns the skipped id range."""
        self.flush_symbol(symbol)
        return self._markets[symbol].consume_ids(count)

    def send_bad_frame(self, symbol: str, kind: str) -> int:
        """Fault: send a corrupt frame (see faults.BAD_FRAME_KINDS) on every current stream
        of `symbol`, after whatever changes are pending. Corruption uses up one update id;
        "unknown_event" uses none. Returns the number of streams it went to."""
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"unknown bad frame kind {kind!r}; expected one of {BAD_FRAME_KINDS}")
        market = self._markets[symbol]
        self.flush_symbol(symbol)
        first: int | None = None
        last: int | None = None
        if kind != "unknown_event":
            first, last = market.consume_ids(1)
        streams = list(self._streams_of.get(symbol, ()))
        for stream in streams:
            self._emit(stream, symbol, bad_frame(kind, stream, market, first, last, self._event_ms()))
        return len(streams)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for market in self._markets.values():
            market.subscribe(self._on_update)
        if self.batch:
            return
        for interval in INTERVALS:
            loop = looping_call(self._clock, self.flush, interval)
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stop(self) -> None:
        for market in self._markets.values():
            market.unsubscribe(self._on_update)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for pending in self._pending.values():
            pending.take_frame("", 0)  # discard: the next frame starts at the next change
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._queue = []

    # ------------------------------------------------------------ sending

    def _event_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _on_update(self, update: Update) -> None:
        streams = self._streams_of.get(update.symbol)
        if not streams:
            return
        if self.batch:
            self._queue.append(update)
            self._schedule_end_tick()
            return
        for stream in streams:
            self._pending[stream].add(update)

    def _schedule_end_tick(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.end_tick)

    def _count(self, symbol: str, frame: bytes) -> None:
        self.frames_sent += 1
        self.frames_by_symbol[symbol] += 1
        for listener in self.frame_listeners:
            listener(symbol, frame)

    def _emit(self, stream: str, symbol: str, frame: bytes) -> None:
        """Send one frame to the stream's sockets, in order with everything before it."""
        if self.batch:
            self._queue.append((stream, symbol, frame))
            self._schedule_end_tick()
            return
        prepared = self._prepare(frame)
        for socket in list(self._subs.get(stream, ())):
            socket.sendPreparedMessage(prepared)
        self._count(symbol, frame)

    def _lost(self, stream: str) -> bool:
        """Whether this frame of `stream` is the one a lose_next fault eats."""
        if stream not in self._lose:
            return False
        self._lose.discard(stream)
        self.log.info("fault: binance lost a frame of {stream}", stream=stream)
        return True

    def _send_pending(self, stream: str, pending: _Pending, event_ms: int) -> None:
        frame = pending.take_frame(stream, event_ms)
        if frame is not None and not self._lost(stream):
            self._emit(stream, pending.symbol, frame)

    def flush(self, interval: float) -> None:
        """Send one frame per stream of this cadence that changed since its last flush."""
        event_ms = self._event_ms()
        for stream, pending in list(self._pending.items()):
            if pending.interval == interval:
                self._send_pending(stream, pending, event_ms)

    def flush_symbol(self, symbol: str) -> None:
        """Send the pending changes of every stream of `symbol` now (conflated mode), so that
        what comes next is not merged into them; in batch mode nothing is pending."""
        if self.batch:
            return
        event_ms = self._event_ms()
        for stream in list(self._streams_of.get(symbol, ())):
            self._send_pending(stream, self._pending[stream], event_ms)

    @staticmethod
    def _batch_frame(stream: str, update: Update, event_ms: int, send_time: float) -> bytes:
        return depth_update(
            stream, update.symbol, event_ms, update.first_id, update.last_id, update.bids, update.asks, send_time
        )

    def end_tick(self) -> None:
        """Batch mode: serialize the queued change events and faults, and write each socket's
        frames in one go."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        queue, self._queue = self._queue, []
        if not queue:
            return
        event_ms = self._event_ms()
        now = self._send_time
        subs = self._subs
        out: dict[Any, list[bytes]] = {}
        for item in queue:
            if isinstance(item, Update):
                symbol = item.symbol
                frames = [
                    (stream, symbol, self._batch_frame(stream, item, event_ms, now()))
                    for stream in self._streams_of.get(symbol, ())
                    if not self._lost(stream)
                ]
            else:
                frames = [item]
            for stream, symbol, payload in frames:
                framed = ws_frame(payload)
                for socket in subs.get(stream, ()):
                    buffer = out.get(socket)
                    if buffer is None:
                        out[socket] = [framed]
                    else:
                        buffer.append(framed)
                self._count(symbol, payload)
        for socket, frames_out in out.items():
            socket.write_frames(frames_out)
