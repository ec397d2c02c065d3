"""Fault vocabulary shared by the servers, and the random fault injector for soak tests.

The faults themselves are methods of `SimulatorService` (see FAULTS.md beside this file); this
module holds what several parts need: the records the simulator keeps of clients breaking the
exchanges' rules (`Violation`) and of REST requests (`RestRecord`), the kinds of bad frames,
close codes, and `RandomFaults`, which injects one random recoverable fault every few seconds.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .clock import Clock, looping_call

# send_bad_frame kinds. Every kind but "unknown_event" is corruption: on Binance it uses up one
# update id (as if the real message had been mangled in flight), so a client that rejects it,
# or one that silently skips it, must resync. "unknown_event" is a well-formed message of an
# event type the client does not know; it uses no id and a correct client just ignores it.
BAD_FRAME_KINDS = (
    "malformed_json",  # truncated JSON text
    "nan_price",  # a level priced "NaN"
    "inf_price",  # a level priced "Infinity"
    "zero_price",  # a level priced 0
    "negative_amount",  # a level with amount "-1..."
    "wrong_types",  # numbers as lists: [["0.1"], "2.0"] and the id / timestamp as a list
    "unknown_event",  # well-formed, unknown event name
)

# Close codes the faults use (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
# Binance's reasons (PROTOCOLS.md §1.3, §1.4).
REASON_24H = "24h connection limit"
REASON_PONG_TIMEOUT = "Pong timeout"
REASON_TOO_MANY_MESSAGES = "Too many messages"


def valid_close_code(code: int) -> bool:
    """Codes a server may put in a close frame: 1000-1003, 1007-1014, 3000-4999."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class Violation:
    """A client broke one of the exchange's rules and the simulator reacted as the exchange
    would. `kind`: too_many_messages, too_many_streams, pong_timeout (websocket);
    rest_over_budget (answered 429), rest_ignored_retry_after (418: request before Retry-After
    elapsed), rest_banned (418: request during a ban)."""

    time: float  # reactor clock
    exchange: str
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class RestRecord:
    """One REST request as the simulator answered it. `weight`: what the request costs (Binance
    request weight; Bitstamp 1); `used`: the budget used in the current window after it (not
    counting refused requests); `status`: the HTTP status sent (0 = connection dropped)."""

    time: float  # reactor clock when the request arrived
    path: str
    query: str
    weight: int
    used: int
    status: int
    delay: float  # seconds the response was held back (slow REST)


class RandomFaults:
    """Every `interval` seconds, one random recoverable fault (seeded, one log line each).

    `choose(rng)` returns (description, action); the service supplies it, so this class only
    owns the timing.
    """

    log = Logger()

    def __init__(
        self,
        clock: Clock,
        choose: Callable[[random.Random], tuple[str, Callable[[], Any]]],
        seed: int = 1,
        interval: float = 5.0,
    ):
        if not interval > 0:
            raise ValueError("fault interval must be > 0")
        self._clock = clock
        self._choose = choose
        self.rng = random.Random((seed << 32) ^ zlib.crc32(b"faults"))
        self.interval = interval
        self.injected: list[str] = []
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        if self._loop is None:
            self._loop = looping_call(self._clock, self.inject)
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def inject(self) -> str:
        """Inject one random fault now; returns its description."""
        description, action = self._choose(self.rng)
        self.log.info("fault: {description}", description=description)
        self.injected.append(description)
        try:
            action()
        except Exception:
            self.log.failure("fault {description} failed", description=description)
        return description
