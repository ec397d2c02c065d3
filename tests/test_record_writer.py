"""The recording writer (aggregator/recording.py) and reader errors (simulator/replay.py)."""

import asyncio
import gzip
import io
import threading
import time

import orjson
import pytest
from twisted.internet import reactor
import pytest_twisted

from aggregator import metrics
from aggregator.recording import CannotRecord, Recorder, RecordingFiles, check_writable
from aggregator.recording_format import header
from aggregator.simulator.replay import BadRecording, load_recording
from tests.aio import aio


def event(n, size=10):
    return (1000.0 + n, "kraken", "kraken connection #1", "in", b"x" * size, None)


def read_events(directory):
    return [orjson.loads(line) for p in sorted(directory.iterdir())
            for line in gzip.open(p).read().splitlines()[1:]]


class FakeTime:
    def __init__(self):
        self.now = 1_765_000_000.0

    def __call__(self):
        return self.now


def test_files_rotate_by_size_and_by_age_and_keep_within_the_cap(tmp_path):
    clock = FakeTime()
    files = RecordingFiles(str(tmp_path), max_bytes=40_000, rotate_seconds=60, clock=clock)
    assert files.file_bytes == 10_000
    files.write([event(0)])
    first = files.path
    clock.now += 61  # age
    files.maybe_rotate()
    files.write([event(1)])
    assert files.path != first
    # Incompressible payloads fill files by size; old ones go past the cap.
    import os
    for n in range(30):
        files.write([(1.0, "kraken", "c", "in", os.urandom(3000), None)])
    files.close()
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert sum(sizes) <= 40_000 + 10_000  # closed files + one file's worth of overshoot
    assert files.deleted and first in files.deleted
    assert all(size < 10_000 + 5_000 for size in sizes)


def test_events_are_written_as_documented(tmp_path):
    files = RecordingFiles(str(tmp_path), max_bytes=10**9)
    files.write([
        (1.5, "kraken", "kraken connection #1", "open", b"", {"url": "ws://127.0.0.1:9"}),
        (1.6, "kraken", "kraken connection #1", "in", b'{"a":1}', None),
        (1.7, "kraken", "kraken connection #1", "out", b"\xff\x00", None),
        (1.8, "kraken", None, "rest", b"[]", {"url": "http://127.0.0.1:9/x?y=1", "status": 200}),
    ])
    files.close()
    (path,) = tmp_path.iterdir()
    lines = gzip.open(path).read().splitlines()
    assert orjson.loads(lines[0])["format"] == "aggregator-recording"
    assert [orjson.loads(line) for line in lines[1:]] == [
        {"t": 1.5, "v": "kraken", "c": "kraken connection #1", "k": "open", "url": "ws://127.0.0.1:9"},
        {"t": 1.6, "v": "kraken", "c": "kraken connection #1", "k": "in", "d": '{"a":1}'},
        {"t": 1.7, "v": "kraken", "c": "kraken connection #1", "k": "out", "b": "/wA="},
        {"t": 1.8, "v": "kraken", "k": "rest", "url": "http://127.0.0.1:9/x?y=1", "status": 200, "d": "[]"},
    ]
    recording = load_recording(str(tmp_path))
    (connection,) = recording.connections["kraken"]
    assert [(f.kind, f.payload, f.binary) for f in connection.frames] == [
        ("in", b'{"a":1}', False), ("out", b"\xff\x00", True)]
    assert recording.rest["kraken"] == {"/x?y=1": [(200, b"[]")]}


class SlowFile(io.BytesIO):
    """A disk that takes its time: each write waits until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def write(self, data):
        self.release.wait(5)
        return super().write(data)

    def close(self):
        pass


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path):
    slow = SlowFile()
    files = RecordingFiles(str(tmp_path), max_bytes=10**9, opener=lambda path: slow)
    recorder = Recorder(reactor, files, queue_bytes=10_000)
    counted = metrics.RECORD_DROPPED._value.get()
    recorder.startService()
    try:
        started = time.monotonic()
        for n in range(1000):  # ~110 kB into a 10 kB queue, the writer stuck on the disk
            recorder.offer(event(n))
        elapsed = time.monotonic() - started
        assert elapsed < 0.5, "offer waited for the disk"
        assert recorder.dropped >= 1000 - 10_000 // 110 - 1
        assert metrics.RECORD_DROPPED._value.get() - counted == recorder.dropped
    finally:
        slow.release.set()
        recorder.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_writes_what_was_queued_and_records_nothing_after(tmp_path):
    recorder = Recorder(reactor, RecordingFiles(str(tmp_path), max_bytes=10**9))
    tap = recorder.venue("kraken")
    tap.opened("kraken connection #1", "ws://127.0.0.1:9")
    recorder.startService()
    for n in range(100):
        tap.received("kraken connection #1", b'{"n": %d}' % n, 1000.0 + n)
    await recorder.stopService()
    tap.closed("kraken connection #1", "shutting down")  # the daemon's own shutdown
    events = read_events(tmp_path)
    assert [e["k"] for e in events] == ["open"] + ["in"] * 100
    assert events[-1] == {"t": 1099.0, "v": "kraken", "c": "kraken connection #1", "k": "in",
                          "d": '{"n": 99}'}
    assert recorder.dropped == 0


class FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(28, "No space left on device")


@pytest_twisted.ensureDeferred
async def test_a_failing_disk_drops_and_counts_and_the_recorder_goes_on(tmp_path):
    files = RecordingFiles(str(tmp_path), max_bytes=10**9, opener=lambda path: FullDisk())
    recorder = Recorder(reactor, files)
    recorder.startService()
    for n in range(10):
        recorder.offer(event(n))
    await recorder.stopService()
    await aio(asyncio.sleep(0))  # the thread's report, through callFromThread
    assert recorder.dropped == 10


def test_an_unwritable_directory_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CannotRecord, match=f"cannot write to {blocker}/rec"):
        check_writable(str(blocker / "rec"))


def write_file(directory, name, content: bytes, compress=True):
    path = directory / name
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


NAME = "rec-20261206T000000-000001.jsonl.gz"
EVENT = b'{"t":1.0,"v":"kraken","c":"c1","k":"in","d":"{}"}\n'
GOOD = header(1.0, 1.0) + EVENT


def test_a_truncated_file_names_file_and_line(tmp_path):
    path = write_file(tmp_path, NAME, gzip.compress(GOOD + EVENT * 200)[:-30], compress=False)
    with pytest.raises(BadRecording, match=rf"^{path}:\d+: truncated"):
        load_recording(str(tmp_path))


def test_a_corrupt_line_names_file_and_line(tmp_path):
    path = write_file(tmp_path, NAME, GOOD + b'{"t":2.0,"v":"kra\n')
    with pytest.raises(BadRecording, match=rf"^{path}:3: corrupt line"):
        load_recording(str(tmp_path))


def test_an_event_missing_a_field_names_file_and_line(tmp_path):
    path = write_file(tmp_path, NAME, GOOD + b'{"t":2.0,"v":"kraken","k":"in"}\n')
    with pytest.raises(BadRecording, match=rf"^{path}:3: corrupt event"):
        load_recording(str(tmp_path))


def test_an_unknown_version_names_file_and_line(tmp_path):
    path = write_file(tmp_path, NAME, b'{"format":"aggregator-recording","version":99}\n')
    with pytest.raises(BadRecording, match=rf"^{path}:1: unknown format version 99"):
        load_recording(str(tmp_path))


def test_not_gzip_names_file_and_line(tmp_path):
    path = write_file(tmp_path, NAME, b"plain text\n", compress=False)
    with pytest.raises(BadRecording, match=rf"^{path}:1: corrupt compressed data"):
        load_recording(str(tmp_path))


def test_an_empty_directory_is_no_recording(tmp_path):
    with pytest.raises(BadRecording, match="no recording files"):
        load_recording(str(tmp_path))


def rest_get(resource, uri):
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([])
    request.uri = uri
    body = resource.render_GET(request)
    return request.responseCode or 200, body


def test_rest_answers_replay_in_order_by_path_and_query_else_by_path():
    from aggregator.simulator.replay import ReplayRest

    rest = ReplayRest({
        "/api/v2/order_book/btcusd/?_=1": [(200, b"first"), (200, b"second")],
        "/api/v3/exchangeInfo": [(503, b"busy"), (200, b"info")],
    })
    assert rest_get(rest, b"/api/v3/exchangeInfo") == (503, b"busy")
    assert rest_get(rest, b"/api/v3/exchangeInfo") == (200, b"info")
    assert rest_get(rest, b"/api/v3/exchangeInfo") == (200, b"info")  # the last one again
    # Bitstamp's cache buster differs on every run: the path decides.
    assert rest_get(rest, b"/api/v2/order_book/btcusd/?_=99") == (200, b"first")
    assert rest_get(rest, b"/api/v2/order_book/btcusd/?_=100") == (200, b"second")
    assert rest_get(rest, b"/nothing")[0] == 404
