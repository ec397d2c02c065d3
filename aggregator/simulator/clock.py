"""The part of the reactor the simulator's timing uses, as typing Protocols.

Twisted declares Clock and IDelayedCall as zope interfaces, which mypy cannot check
calls against (without a plugin); these say the same for the simulator's code. Tests pass a
twisted.internet.task.Clock, production code the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall: ...
