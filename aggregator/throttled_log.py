"""Log a recurring problem once per burst, not once per occurrence.

A feed spewing garbage must not flood the log: the first occurrence of each
kind is logged, repeats within the window are counted, and the next line says
how many were suppressed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class ThrottledLog:
    def __init__(self, logger: Logger, clock: IReactorTime, window: float = 10.0) -> None:
        self._logger = logger
        self._clock = clock
        self._window = window
        self._seen: dict[Any, list[float]] = {}  # key → [window start, suppressed count]

    def warn(self, key: Any, format: str, **fields: Any) -> None:
        now = self._clock.seconds()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self._window:
            entry[1] += 1
            return
        suppressed = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        if suppressed:
            format += " ({suppressed} similar in the last {window:.0f}s not logged)"
        self._logger.warn(format, suppressed=suppressed, window=self._window, **fields)
