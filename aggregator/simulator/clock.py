"""The part of the reactor the simulator's timing uses, as typing Protocols.

Twisted declares Clock and IDelayedCall as zope interfaces, which mypy cannot check
calls against (without a plugin); these say the same for the simulator's code. Tests pass a
twisted.internet.task.Clock, production code the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.task import LoopingCall


class DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall: ...


def looping_call(clock: Clock, f: Callable[..., Any], *args: Any) -> LoopingCall:
    """A LoopingCall of f(*args) on `clock` (not started)."""
    loop = LoopingCall(f, *args)
    loop.clock = clock  # type: ignore[assignment]  # LoopingCall declares the zope interface
    return loop
