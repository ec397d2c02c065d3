"""Playing a timed script of actions on the reactor clock: the only place sources meet time."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator


from twisted.logger import Logger

from .clock import Clock, DelayedCall
from .market import Market

# (script time in seconds, action). Script times never decrease.
Step = tuple[float, Callable[[], object]]


class Player:
    """Runs each action of a script when its time comes, with time scaled by `speed`.

    Script time t is due at reactor time origin + t / speed. The player catches up in one timer
    call when several steps are due (high speeds, a late reactor, `Clock.advance`), so the
    number of steps per reactor second is not limited by timer resolution.

    It can be started/stopped (the service) and paused/resumed (the user) independently; it
    plays only while started and not paused, and it resumes where it stopped in script time.
    """

    log = Logger()
    # Steps run in one timer call before yielding to the reactor.
    MAX_BATCH = 2000
    # Slack so that a timer landing a rounding error before the due time does not respin.
    EPSILON = 1e-9

    def __init__(self, clock: Clock, script: Iterable[Step], speed: float = 1.0, name: str = ""):
        if not speed > 0:
            raise ValueError("speed must be > 0")
        self._clock = clock
        self._script: Iterator[Step] = iter(script)
        self._speed = float(speed)
        self.name = name
        self._next: Step | None = None
        self._origin = 0.0
        self._position = 0.0  # script time reached when last deactivated
        self._started = False
        self._paused = False
        self._call: DelayedCall | None = None
        self.finished = False
        self.steps = 0
        self._advance()

    @property
    def active(self) -> bool:
        return self._started and not self._paused

    def start(self) -> None:
        self._set(started=True)

    def stop(self) -> None:
        self._set(started=False)

    def pause(self) -> None:
        self._set(paused=True)

    def resume(self) -> None:
        self._set(paused=False)

    def _set(self, started: bool | None = None, paused: bool | None = None) -> None:
        was = self.active
        if started is not None:
            self._started = started
        if paused is not None:
            self._paused = paused
        if was and not self.active:
            self._position = (self._clock.seconds() - self._origin) * self._speed
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
        elif self.active and not was:
            self._origin = self._clock.seconds() - self._position / self._speed
            self._schedule()

    def _advance(self) -> None:
        self._next = next(self._script, None)
        if self._next is None:
            self.finished = True

    def _due(self, step: Step) -> float:
        return self._origin + step[0] / self._speed

    def _schedule(self) -> None:
        if self._next is None or self._call is not None:
            return
        delay = max(0.0, self._due(self._next) - self._clock.seconds())
        self._call = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds() + self.EPSILON
        done = 0
        while self.active and self._next is not None and self._due(self._next) <= now:
            _, action = self._next
            self._advance()
            try:
                action()
            except Exception:
                self.log.failure("simulator step of {name} failed", name=self.name)
            self.steps += 1
            done += 1
            if done >= self.MAX_BATCH:
                break
        if self.active:
            self._schedule()


class PlayedSource:
    """Base of the data sources: markets, each driven by one Player."""

    def __init__(self) -> None:
        self.markets: dict[tuple[str, str], Market] = {}  # (exchange, symbol) ->
        self._players: list[Player] = []

    @property
    def finished(self) -> bool:
        """True once every script has run out (only ever with loop=False)."""
        return all(p.finished for p in self._players)

    def start(self) -> None:
        for p in self._players:
            p.start()

    def stop(self) -> None:
        for p in self._players:
            p.stop()

    def pause(self) -> None:
        for p in self._players:
            p.pause()

    def resume(self) -> None:
        for p in self._players:
            p.resume()
