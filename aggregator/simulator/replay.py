"""Replaying a `--record` recording (docs/RECORDING.md) to the daemon's normal feed code.

Each venue gets a websocket and a REST listener, as with the other sources. The n-th
websocket connection a client opens to a venue plays the venue's n-th recorded connection:
its inbound frames, byte for byte, at the recorded gaps divided by `speed` (0: as fast as
possible). Raw frames are replayed rather than driving the venues' Market books because a
recording holds what the venue sent, acks and errors included, for any venue (the Markets
would need a parser per venue and could only rebuild what they model). A recorded outbound
frame is a wait: playback goes on once the client has sent a frame there too, so a replayed
frame never reaches the client before the request it answered. REST answers are served by
path and query, the same URL getting its recorded answers in order (the last one again once
they run out).

Determinism: the frames of one connection always reach the client in the recorded order,
paused at the same points, so a daemon consuming one connection per book (a venue whose
snapshots come over the websocket: Bybit, Coinbase, Kraken) publishes the same sequence of
Summaries on every replay. Across connections (several venues merged, Binance's and
Bitstamp's REST snapshots) the interleaving depends on scheduling, as it did when recorded.

Errors: a truncated, corrupt or unknown-version file is `BadRecording("FILE:LINE: ...")`.
"""

from __future__ import annotations

import base64
import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from aggregator.recording_format import FILE_PATTERN, FORMAT, KINDS, VERSION

from .venues import EXCHANGES

# Frames sent in one reactor turn when replaying as fast as possible: the client reads between.
FAST_BATCH = 200


class BadRecording(Exception):
    """A recording that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Frame:
    t: float
    kind: str  # in, out, close
    payload: bytes
    binary: bool


@dataclass
class RecordedConnection:
    label: str
    frames: list[Frame] = field(default_factory=list)


@dataclass
class Recording:
    files: list[Path]
    # venue -> its connections in the order they opened
    connections: dict[str, list[RecordedConnection]] = field(default_factory=dict)
    # venue -> path?query -> recorded (status, body) answers in order
    rest: dict[str, dict[str, list[tuple[int, bytes]]]] = field(default_factory=dict)
    events: int = 0


def _payload(event: dict[str, Any]) -> tuple[bytes, bool]:
    if "b" in event:
        return base64.b64decode(event["b"], validate=True), True
    return str(event.get("d", "")).encode("utf-8"), False


def _add_event(recording: Recording, run: Any, event: Any, by_label: dict[Any, RecordedConnection]) -> None:
    if not isinstance(event, dict):
        raise ValueError("an event is a JSON object")
    kind = event["k"]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    t, venue = float(event["t"]), str(event["v"])
    payload, binary = _payload(event)
    if kind == "rest":
        parts = urlsplit(str(event["url"]))
        key = parts.path + (f"?{parts.query}" if parts.query else "")
        recording.rest.setdefault(venue, {}).setdefault(key, []).append((int(event["status"]), payload))
    else:
        label = str(event["c"])
        connection = by_label.get((run, venue, label))
        if connection is None or kind == "open":  # a reconnect under the same label is new
            connection = by_label[(run, venue, label)] = RecordedConnection(label)
            recording.connections.setdefault(venue, []).append(connection)
        if kind != "open":
            connection.frames.append(Frame(t, kind, payload, binary))
    recording.events += 1


def _read_file(path: Path, recording: Recording, by_label: dict[Any, RecordedConnection]) -> None:
    number = 0
    run: Any = None
    try:
        with gzip.open(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.endswith(b"\n"):
                    raise BadRecording(f"{path}:{number}: truncated (the last line is incomplete)")
                try:
                    document = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    raise BadRecording(f"{path}:{number}: corrupt line ({error})") from None
                if number == 1:
                    if not isinstance(document, dict) or document.get("format") != FORMAT:
                        raise BadRecording(f"{path}:1: not an {FORMAT} file (no header)")
                    if document.get("version") != VERSION:
                        raise BadRecording(
                            f"{path}:1: unknown format version {document.get('version')!r} "
                            f"(this simulator reads version {VERSION})"
                        )
                    run = document.get("run")
                    continue
                try:
                    _add_event(recording, run, document, by_label)
                except (KeyError, ValueError, TypeError) as error:
                    raise BadRecording(f"{path}:{number}: corrupt event ({error!s})") from None
    except EOFError:
        raise BadRecording(
            f"{path}:{number + 1}: truncated (the compressed stream ends early)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise BadRecording(f"{path}:{number + 1}: corrupt compressed data ({error})") from None
    except OSError as error:
        raise BadRecording(f"{path}: cannot read ({error.strerror or error})") from None
    if number == 0:
        raise BadRecording(f"{path}:1: empty file (no header)")


def load_recording(directory: str) -> Recording:
    """Every recording file of `directory`, oldest first, or BadRecording."""
    path = Path(directory)
    if not path.is_dir():
        raise BadRecording(f"{directory}: not a directory")
    files = sorted(p for p in path.iterdir() if FILE_PATTERN.match(p.name))
    if not files:
        raise BadRecording(f"{directory}: no recording files (rec-*.jsonl.gz)")
    recording = Recording(files)
    by_label: dict[Any, RecordedConnection] = {}
    for file in files:
        _read_file(file, recording, by_label)
    return recording


class _Player:
    """Plays one recorded connection to one client (see the module docstring).

    As fast as possible (speed 0), it is the transport's streaming producer: it
    pauses while the client's socket buffer is full, so it goes at the pace the
    client reads, and the buffer stays bounded by the transport's high-water mark."""

    def __init__(self, protocol: ReplayProtocol, frames: list[Frame], reactor: Any, speed: float):
        self._protocol = protocol
        self._frames = frames
        self._reactor = reactor
        self._speed = speed
        self._position = 0
        self._client_frames = 0  # received from the client, not yet matched to a recorded one
        self._origin = reactor.seconds()
        self._t0 = frames[0].t if frames else 0.0
        self._call: Any = None
        self._paused = False
        self.done = not frames

    # -- IPushProducer (speed 0) ---------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self.stop()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._call is None and not self.done:
            self._call = self._reactor.callLater(0, self._step)

    def stopProducing(self) -> None:
        self._paused = True
        self.stop()

    def client_frame(self) -> None:
        self._client_frames += 1
        if self._call is None and not self.done:
            self._step()

    def start(self) -> None:
        if not self._speed:
            transport: Any = self._protocol.transport  # a TCP transport: IConsumer too
            transport.registerProducer(self, True)
        self._step()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _rebase(self, t: float) -> None:
        """Recorded time `t` is now: waiting for the client does not make frames late."""
        self._origin, self._t0 = self._reactor.seconds(), t

    def _step(self) -> None:
        self._call = None
        sent = 0
        while self._position < len(self._frames) and not self._paused:
            frame = self._frames[self._position]
            if frame.kind == "out":
                if not self._client_frames:
                    return  # client_frame() goes on
                self._client_frames -= 1
                self._position += 1
                self._rebase(frame.t)
                continue
            if self._speed:
                delay = self._origin + (frame.t - self._t0) / self._speed - self._reactor.seconds()
                if delay > 0:
                    self._call = self._reactor.callLater(delay, self._step)
                    return
            elif sent >= FAST_BATCH:
                self._call = self._reactor.callLater(0, self._step)
                return
            self._position += 1
            if frame.kind == "in":
                self._protocol.sendMessage(frame.payload, isBinary=frame.binary)
                sent += 1
            else:  # close
                self._protocol.sendClose(1000, "recorded close")
                self._position = len(self._frames)
        if self._position >= len(self._frames):
            self.done = True


class ReplayProtocol(WebSocketServerProtocol):
    factory: ReplayWsFactory
    player: _Player | None = None

    def onOpen(self) -> None:
        self.factory.protocols.add(self)
        recorded = self.factory.next_connection()
        if recorded is None:
            return  # the recording is over: a quiet market
        self.player = _Player(self, recorded.frames, self.factory.reactor, self.factory.speed)
        self.player.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.player is not None:
            self.player.client_frame()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.protocols.discard(self)
        if self.player is not None:
            self.player.stop()


class ReplayWsFactory(WebSocketServerFactory):
    protocol = ReplayProtocol  # type: ignore[assignment]  # autobahn protocols are not typed as twisted ones
    noisy = False

    def __init__(self, connections: list[RecordedConnection], reactor: Any, speed: float) -> None:
        super().__init__()
        self.connections = connections
        self.reactor = reactor
        self.speed = speed
        self.opened = 0
        self.protocols: set[ReplayProtocol] = set()
        self.setProtocolOptions(autoPingInterval=0)

    def next_connection(self) -> RecordedConnection | None:
        if self.opened >= len(self.connections):
            return None
        self.opened += 1
        return self.connections[self.opened - 1]

    @property
    def finished(self) -> bool:
        return self.opened == len(self.connections) and all(
            p.player is None or p.player.done for p in self.protocols
        )


class ReplayRest(Resource):
    """The recorded answers of the same path and query, in order; failing that, of
    the same path (a query carrying a time, as Bitstamp's cache buster `_=`,
    differs on every run)."""

    isLeaf = True

    def __init__(self, answers: dict[str, list[tuple[int, bytes]]]) -> None:
        super().__init__()
        self._answers = {key: list(values) for key, values in answers.items()}
        self._by_path: dict[str, list[tuple[int, bytes]]] = {}
        for key, values in answers.items():
            self._by_path.setdefault(key.partition("?")[0], []).extend(values)

    def render_GET(self, request: Request) -> bytes:
        uri = request.uri.decode("utf-8", "replace") if request.uri else "/"
        answers = self._answers.get(uri) or self._by_path.get(uri.partition("?")[0])
        request.setHeader(b"content-type", b"application/json")
        if not answers:
            request.setResponseCode(404)
            return orjson.dumps({"error": f"{uri} is not in the recording"})
        status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        request.setResponseCode(status)
        return body


class ReplayService(Service):
    """Serves a Recording on loopback: `urls` as SimulatorService's."""

    log = Logger()

    def __init__(self, recording: Recording, reactor: Any = None, speed: float = 1.0,
                 host: str = "127.0.0.1", ports: dict[str, int] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.recording = recording
        self.speed = speed
        self._reactor = reactor
        self._host = host
        self._ports = ports or {}  # "<venue>_ws" / "<venue>_rest" -> port; 0 or missing: any
        self.urls: dict[str, str] = {}
        self._ws = {name: ReplayWsFactory(recording.connections.get(name, []), reactor, speed)
                    for name in EXCHANGES}
        self._listening: list[Any] = []

    @property
    def finished(self) -> bool:
        """Every recorded connection has been played to its end."""
        return all(factory.finished for factory in self._ws.values())

    def startService(self) -> None:
        super().startService()
        try:
            for name in EXCHANGES:
                self._listen(name)
        except Exception:
            for port in self._listening:
                port.stopListening()
            self._listening = []
            raise
        self.log.info(
            "replaying {events} recorded events from {files} files (speed {speed}): {urls}",
            events=self.recording.events, files=len(self.recording.files),
            speed=self.speed or "as fast as possible", urls=self.urls,
        )

    def _listen(self, name: str) -> None:
        ws = self._reactor.listenTCP(
            self._ports.get(f"{name}_ws", 0), self._ws[name], interface=self._host)
        self._listening.append(ws)
        site = Site(ReplayRest(self.recording.rest.get(name, {})))
        site.noisy = False
        rest = self._reactor.listenTCP(
            self._ports.get(f"{name}_rest", 0), site, interface=self._host)
        self._listening.append(rest)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.urls[f"{name}_ws_url"] = f"ws://{host}:{ws.getHost().port}"
        self.urls[f"{name}_rest_url"] = f"http://{host}:{rest.getHost().port}"

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for factory in self._ws.values():
            for protocol in list(factory.protocols):
                if protocol.player is not None:
                    protocol.player.stop()
                protocol.dropConnection(abort=True)
        listening, self._listening = self._listening, []
        return gatherResults([maybeDeferred(port.stopListening) for port in listening])
