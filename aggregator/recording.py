"""`--record DIR`: every venue connection's frames and REST responses, to disk.

The taps (`VenueTap`, one per venue, the observer of its connections and of
its JsonHttp) run on the reactor and only append a tuple to the Recorder's
queue, which is bounded in bytes: when it is full (a slow disk, a burst) the
event is dropped and counted (aggregator_record_dropped_total), never waited
for. A dedicated writer thread drains the queue: it serializes the events
(aggregator/recording_format.py, docs/RECORDING.md), gzips them, rotates files
by size and age, and deletes the oldest past the disk cap.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from aggregator import metrics
from aggregator.recording_format import FILE_PATTERN, event_line, header, payload_fields
from aggregator.throttled_log import ThrottledLog

# (time, venue, connection label or None, kind, payload, extra fields)
Event = tuple[float, str, str | None, str, bytes, dict[str, Any] | None]

# What one queued event costs beyond its payload (tuple, strings, JSON keys).
EVENT_OVERHEAD = 100
DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024
DEFAULT_ROTATE_SECONDS = 3600.0
MAX_FILE_BYTES = 64 * 1024 * 1024
# The writer looks at the queue this often; each batch is flushed to the file
# (gzip sync flush), so a crash loses about this much.
POLL_SECONDS = 0.05
MAX_BATCH = 10_000


class CannotRecord(Exception):
    """The recording directory cannot be written."""


def check_writable(directory: str) -> None:
    """Creates `directory` if needed and writes a file in it, or raises CannotRecord."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CannotRecord(f"cannot write to {directory}: {error.strerror or error}") from None


class _CountingFile:
    """The raw file under the gzip stream, counting compressed bytes written."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.written = 0

    def write(self, data: Any) -> int:
        n = self.raw.write(data)
        self.written += len(data)
        return n

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


class RecordingFiles:
    """The files of one recording run (writer thread only): the current gzip
    file, rotation by compressed size and age, and the cap on total size."""

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
        clock: Callable[[], float] = time.time,
        opener: Callable[[Path], IO[bytes]] = lambda path: open(path, "xb"),
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Several files fit in the cap, so that deleting the oldest frees a fraction of it.
        self.file_bytes = max(1, min(MAX_FILE_BYTES, max_bytes // 4))
        self.rotate_seconds = rotate_seconds
        self._clock = clock
        self._opener = opener
        self._run = clock()  # tells this run's connections from earlier runs' in the same dir
        self._sequence = 0
        self._raw: _CountingFile | None = None
        self._gzip: gzip.GzipFile | None = None
        self._opened_at = 0.0
        self.path: Path | None = None
        self.deleted: list[Path] = []

    def write(self, events: Iterable[Event]) -> None:
        if self._gzip is None:
            self._open()
        gz = self._gzip
        assert gz is not None
        for t, venue, connection, kind, payload, extra in events:
            fields: dict[str, Any] = {"t": t, "v": venue}
            if connection is not None:
                fields["c"] = connection
            fields["k"] = kind
            if extra:
                fields.update(extra)
            if payload or kind in ("in", "out", "rest"):
                fields.update(payload_fields(payload))
            gz.write(event_line(fields))
        gz.flush()  # a sync flush: what is written so far can be read back
        self.maybe_rotate()

    def maybe_rotate(self) -> None:
        raw = self._raw
        if raw is None:
            return
        if raw.written >= self.file_bytes or self._clock() - self._opened_at >= self.rotate_seconds:
            self.close()

    def close(self) -> None:
        gz, raw = self._gzip, self._raw
        self._gzip = self._raw = None
        if gz is not None and raw is not None:
            gz.close()
            raw.close()

    def _open(self) -> None:
        now = self._clock()
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        self.path = self.directory / f"rec-{stamp}-{self._sequence:06d}.jsonl.gz"
        self._enforce_cap()
        self._raw = _CountingFile(self._opener(self.path))
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw)
        self._opened_at = now
        self._gzip.write(header(now, self._run))

    def _enforce_cap(self) -> None:
        """Delete the oldest files until they and a full new file fit in the cap."""
        files = sorted(p for p in self.directory.iterdir() if FILE_PATTERN.match(p.name))
        sizes = {p: p.stat().st_size for p in files}
        total = sum(sizes.values())
        while files and total + self.file_bytes > self.max_bytes:
            oldest = files.pop(0)
            oldest.unlink(missing_ok=True)
            total -= sizes[oldest]
            self.deleted.append(oldest)


class Recorder(Service):
    """Owns the bounded queue and the writer thread (see the module docstring).

    No lock on the reactor's side: the queue is a deque (append and popleft are
    atomic), and its size in bytes is what the reactor offered minus what the
    writer took, each counter written by one thread only (a stale read only
    makes the bound stricter). The writer polls every POLL_SECONDS."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        files: RecordingFiles,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        self._reactor = reactor
        self.files = files
        self.queue_bytes = queue_bytes
        self._queue: deque[Event] = deque()
        self._offered = 0  # bytes queued, ever (reactor thread only)
        self._taken = 0  # bytes the writer took off the queue, ever (writer thread only)
        self._closing = threading.Event()
        self._accepting = True  # what the reactor side reads: cheaper than the Event
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._problems = ThrottledLog(self.log, reactor)
        self.dropped = 0
        self._dropped_metric = metrics.RECORD_DROPPED

    def venue(self, name: str) -> VenueTap:
        return VenueTap(self, name)

    # -- reactor side -----------------------------------------------------------

    def offer(self, event: Event) -> None:
        """Queue `event` if the queue has room, else drop and count it. Never waits."""
        if not self._accepting:
            return  # stopping: the feeds' own shutdown is not the venues' traffic
        size = len(event[4]) + EVENT_OVERHEAD
        if self._offered - self._taken + size <= self.queue_bytes:
            self._queue.append(event)
            self._offered += size
            return
        self.dropped += 1
        self._dropped_metric.inc()
        self._problems.warn(
            "full",
            "recording: write buffer full ({limit} bytes: the disk is slower than the "
            "feeds); events dropped, {dropped} so far",
            limit=self.queue_bytes, dropped=self.dropped,
        )

    def startService(self) -> None:
        super().startService()
        self._accepting = True
        self._closing.clear()
        self._stopped = Deferred()
        self._thread = threading.Thread(
            target=self._run, args=(self._stopped,), name="recorder", daemon=True
        )
        self._thread.start()
        self.log.info("recording venue traffic to {directory}", directory=str(self.files.directory))

    def stopService(self) -> Deferred[None]:
        """Fires once what was queued until now is written and the file closed."""
        super().stopService()
        self._accepting = False
        self._closing.set()
        stopped, self._stopped = self._stopped, None
        return stopped if stopped is not None else succeed(None)

    # -- writer thread ------------------------------------------------------------

    def _run(self, stopped: Deferred[None]) -> None:
        try:
            while True:
                closing = self._closing.is_set()
                batch = self._take()
                if batch:
                    self._write(batch)
                else:
                    self.files.maybe_rotate()
                if closing and not self._queue:
                    break
                if not batch:
                    self._closing.wait(POLL_SECONDS)
        finally:
            self._close_files()
            self._reactor.callFromThread(stopped.callback, None)

    def _take(self) -> list[Event]:
        queue, size = self._queue, 0
        batch: list[Event] = []
        while queue and len(batch) < MAX_BATCH:
            event = queue.popleft()
            batch.append(event)
            size += len(event[4]) + EVENT_OVERHEAD
        self._taken += size
        return batch

    def _write(self, batch: list[Event]) -> None:
        try:
            self.files.write(batch)
        except OSError as error:
            # A full or broken disk: what was in the batch is lost, counted; the
            # next batch starts a new file.
            self._dropped_metric.inc(len(batch))
            self._reactor.callFromThread(self._write_failed, len(batch), str(error))
            self._close_files()

    def _close_files(self) -> None:
        try:
            self.files.close()
        except OSError:
            pass  # the file is lost anyway; _write_failed said why

    def _write_failed(self, count: int, error: str) -> None:
        self.dropped += count
        self._problems.warn(
            "disk", "recording: cannot write ({error}); {count} events dropped",
            error=error, count=count,
        )


class VenueTap:
    """One venue's observer: of its connections (Connection.observer) and of
    its REST answers (JsonHttp.observer). Each call queues one event."""

    def __init__(self, recorder: Recorder, venue: str) -> None:
        self._offer = recorder.offer
        self._clock = recorder._reactor
        self.venue = venue

    def opened(self, label: str, url: str) -> None:
        self._offer((self._clock.seconds(), self.venue, label, "open", b"", {"url": url}))

    def received(self, label: str, payload: bytes, arrival: float) -> None:
        self._offer((arrival, self.venue, label, "in", payload, None))

    def sent(self, label: str, payload: bytes) -> None:
        self._offer((self._clock.seconds(), self.venue, label, "out", payload, None))

    def closed(self, label: str, reason: str) -> None:
        self._offer((self._clock.seconds(), self.venue, label, "close", b"", {"reason": reason}))

    def responded(self, url: str, status: int, body: bytes) -> None:
        self._offer((self._clock.seconds(), self.venue, None, "rest", body,
                     {"url": url, "status": status}))
