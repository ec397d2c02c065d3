"""The garbage collector's pauses: measured, and made rarer.

CPython's cycle collector runs inside whatever allocates when a generation's
count passes its threshold: on the event loop, in the middle of a frame.
Its full collections walk every tracked object, and the daemon holds a few
hundred thousand after start-up (grpc, Twisted, protobuf, the symbol
lists) that never become garbage. `GcTuning`:

- measures every collection (`aggregator_gc_pause_seconds`, by generation),
  through `gc.callbacks`, so a pause shows up in the metrics;
- `gc.freeze()`s the heap once the daemon has started, and again at a few
  moments while it settles (symbol lists loaded, pinned books built: with
  1,500 symbols the snapshots take minutes under the REST budget), so
  collections no longer walk it. A full collection over 1,500 books
  (550,000 objects) took ~250 ms here. A bounded number of freezes: an
  object frozen and later part of a garbage cycle is never collected;
- raises the young generation's threshold: the hot path allocates many
  short-lived containers (decoded frames), which reference counting frees
  anyway; collecting them every 700 allocations only costs time.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from aggregator import metrics

GC_MODES = ("tuned", "python")
# Young-generation threshold (Python's default is 700): about a few
# thousand frames between collections.
YOUNG_THRESHOLD = 50_000
# Seconds after start-up when the heap is frozen again (a few: see above).
SETTLE_TIMES = (60.0, 300.0, 900.0)


class GcTuning(Service):
    """Installs the measurement and, in mode "tuned", the tuning; undoes both on stop."""

    log = Logger()

    def __init__(
        self, mode: str, reactor: IReactorTime, settle: tuple[float, ...] = SETTLE_TIMES
    ) -> None:
        if mode not in GC_MODES:
            raise ValueError(f"unknown gc mode {mode!r}; known: {', '.join(GC_MODES)}")
        self.mode = mode
        self.reactor = reactor
        self.settle = settle
        self._started_at: float | None = None
        self._thresholds: tuple[int, int, int] | None = None
        self._refreeze: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        gc.callbacks.append(self._collection)
        if self.mode == "tuned":
            self._thresholds = gc.get_threshold()
            _, middle, old = self._thresholds
            gc.set_threshold(YOUNG_THRESHOLD, middle, old)
            gc.freeze()
            self._schedule(0)
            self.log.info("gc: start-up heap frozen ({count} objects), young threshold {young}",
                          count=gc.get_freeze_count(), young=YOUNG_THRESHOLD)

    def stopService(self) -> None:
        super().stopService()
        if self._collection in gc.callbacks:
            gc.callbacks.remove(self._collection)
        if self._refreeze is not None and self._refreeze.active():
            self._refreeze.cancel()
        self._refreeze = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
            # Frozen objects that became garbage since are collectable again.
            gc.unfreeze()

    def _schedule(self, index: int) -> None:
        if index < len(self.settle):
            started = self.settle[index - 1] if index else 0.0
            self._refreeze = self.reactor.callLater(
                self.settle[index] - started, self._freeze_settled, index
            )

    def _freeze_settled(self, index: int) -> None:
        self._refreeze = None
        gc.freeze()
        self.log.info("gc: heap frozen again after {seconds:.0f}s ({count} objects)",
                      seconds=self.settle[index], count=gc.get_freeze_count())
        self._schedule(index + 1)

    def _collection(self, phase: str, info: dict[str, Any]) -> None:
        # Wall time around the collection itself (perf_counter: the reactor's
        # clock may be a test's Clock, and this is about real time).
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._started_at is not None:
            metrics.GC_PAUSE.labels(str(info.get("generation", "?"))).observe(
                time.perf_counter() - self._started_at
            )
            self._started_at = None
