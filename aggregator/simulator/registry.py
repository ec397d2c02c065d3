"""The fault registry: every fault the simulator can inject, once.

Each `Fault` says what it is called (the control endpoint's /_sim/fault/<name> and the
`--faults` names), which SimulatorService method it is (the Python API; the method asks the
venue how the fault applies to it, see venue.Venue), its control-endpoint parameters with
their types and defaults, whether and how random mode draws it, and what a client sees. Random
mode (`draw`), the control endpoint (control.py) and the table in FAULTS.md (faultdoc.py) are
all read from `FAULTS`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .faults import BAD_FRAME_KINDS

if TYPE_CHECKING:
    from .service import SimulatorService
    from .venue import Venue


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def statuses(text: str) -> list[int | str]:
    """"429,418,drop" → [429, 418, "drop"]."""
    return [s if s == "drop" else int(s) for s in (t.strip() for t in text.split(",")) if s]


def names(text: str) -> list[str]:
    """"stall,drop" → ["stall", "drop"]."""
    return [n for n in text.split(",") if n]


@dataclass(frozen=True)
class Param:
    """One control-endpoint parameter: its name (also the method's keyword), how its query
    string text is read (a ValueError means a bad value), and its default (REQUIRED: none)."""

    name: str
    parse: Callable[[str], Any] = str
    default: Any = REQUIRED
    shape: str = ""  # how FAULTS.md writes the value when the default does not say it
    note: str = ""  # FAULTS.md: said after it in brackets

    def usage(self) -> str:
        """How FAULTS.md writes it: `name` (required), `name?` (optional), `name=default`."""
        if self.shape:
            text = f"{self.name}={self.shape}"
        elif self.default is REQUIRED:
            text = self.name
        elif self.default is None:
            text = f"{self.name}?"
        else:
            text = f"{self.name}={self.default}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class Drawing:
    """What random mode has drawn before asking a fault for its parameters."""

    rng: random.Random
    venue: Venue  # the venue the fault hits
    symbol: str | None  # one of its symbols with subscribers (else any served one), if any
    interval: float  # seconds between random faults
    venues: Sequence[Venue]  # every venue

    def pick(self, options: Sequence[Any]) -> Any:
        # A single option is not drawn, so that it uses no randomness.
        return options[0] if len(options) == 1 else self.rng.choice(options)


# A fault's random draw: (one-line description, keyword arguments), or None when the fault
# does not apply to what was drawn (random mode then drops connections instead).
Draw = Callable[[Drawing], tuple[str, dict[str, Any]] | None]


@dataclass(frozen=True)
class Fault:
    name: str  # /_sim/fault/<name>, --faults names
    method: str  # the SimulatorService method
    sees: str  # what a client sees (FAULTS.md)
    params: tuple[Param, ...] = ()
    draw: Draw | None = None  # None: random mode never picks it
    random_doc: str = ""  # how random mode draws its parameters (FAULTS.md)
    # How the endpoint and random mode call it, when not `method(**params)`.
    fire: Callable[..., Any] | None = None

    def apply(self, sim: SimulatorService, kwargs: Mapping[str, Any]) -> Any:
        if self.fire is not None:
            return self.fire(sim, **kwargs)
        return getattr(sim, self.method)(**kwargs)


# ---------------------------------------------------------------- random draws


def _draw_drop(d: Drawing) -> tuple[str, dict[str, Any]]:
    return f"drop {d.venue.name} websocket clients", {"exchange": d.venue.name}


def _draw_stall(d: Drawing) -> tuple[str, dict[str, Any]]:
    duration = round(d.rng.uniform(1.0, max(1.0, min(d.interval, 10.0))), 1)
    return f"stall {d.venue.name} for {duration} s", {"exchange": d.venue.name, "duration": duration}


def _draw_skip_updates(d: Drawing) -> tuple[str, dict[str, Any]] | None:
    if d.symbol is None:
        return None
    count = d.rng.randint(1, 5)
    where = f"{d.venue.name}:{d.symbol}"
    return f"skip {count} updates of {where}", {"exchange": d.venue.name, "symbol": d.symbol, "count": count}


def _draw_lose_next_update(d: Drawing) -> tuple[str, dict[str, Any]] | None:
    if d.symbol is None:
        return None
    return f"lose the next update of {d.venue.name}:{d.symbol}", {"exchange": d.venue.name, "symbol": d.symbol}


def _draw_bad_frame(d: Drawing) -> tuple[str, dict[str, Any]] | None:
    if d.symbol is None:
        return None
    kind = d.rng.choice(BAD_FRAME_KINDS)
    return f"bad frame {kind} on {d.venue.name}:{d.symbol}", {"exchange": d.venue.name, "symbol": d.symbol, "kind": kind}


def _draw_request_reconnect(d: Drawing) -> tuple[str, dict[str, Any]] | None:
    asking = [v.name for v in d.venues if v.asks_reconnect]
    if not asking:
        return None
    close_after = round(d.rng.uniform(1.0, 5.0), 1)
    return f"{' '.join(asking)} request_reconnect, close after {close_after} s", {"close_after": close_after}


def _draw_close(d: Drawing) -> tuple[str, dict[str, Any]]:
    code, reason = d.pick(d.venue.close_reasons)
    return f"close {d.venue.name} clients {code} {reason!r}", {"exchange": d.venue.name, "code": code, "reason": reason}


def _draw_rest_fault(d: Drawing) -> tuple[str, dict[str, Any]]:
    answer = d.rng.choice(([429], [500], [503], ["drop"]))
    retry_after = d.rng.randint(1, 3)
    return (
        f"{d.venue.name} REST answers {answer[0]} (Retry-After {retry_after})",
        {"exchange": d.venue.name, "statuses": answer, "retry_after": retry_after},
    )


def _draw_stale_snapshot(d: Drawing) -> tuple[str, dict[str, Any]] | None:
    if d.symbol is None:
        return None
    ago = d.rng.randint(1, 20)
    return (
        f"next {d.venue.name}:{d.symbol} snapshot {ago} updates stale",
        {"exchange": d.venue.name, "symbol": d.symbol, "updates_ago": ago},
    )


def _draw_slow_rest(d: Drawing) -> tuple[str, dict[str, Any]]:
    delay = round(d.rng.uniform(0.5, 3.0), 1)
    count = d.rng.randint(1, 5)
    return f"slow {d.venue.name} REST: {count} responses {delay} s late", {"exchange": d.venue.name, "delay": delay, "count": count}


def _drop_websockets(sim: SimulatorService, exchange: str | None = None) -> None:
    # The endpoint answers at once: it does not wait for the connections to be gone.
    sim.drop_clients(exchange, rest=False)


# ---------------------------------------------------------------- the registry

EXCHANGE = Param("exchange")
ANY_EXCHANGE = Param("exchange", default=None)
SYMBOL = Param("symbol")

FAULTS: tuple[Fault, ...] = (
    Fault(
        "drop",
        "drop_clients",
        "TCP connections aborted (no close frame); listeners stay. Per exchange, websocket and/or REST "
        "keep-alive (the control endpoint and random mode drop websocket clients only). Returns a "
        "Deferred that fires once they are gone.",
        (ANY_EXCHANGE,),
        _draw_drop,
        "websocket clients of one venue; also instead of a fault that does not apply",
        fire=_drop_websockets,
    ),
    Fault(
        "stall",
        "stall",
        "Open websocket connections go silent without closing: no data, no pings, no answers to pings, "
        "heartbeats or requests (reading is paused). New connections are served. Data produced meanwhile "
        "is lost (Binance: U gap after). Ends after `duration` s or on `unstall`; then the queued client "
        "frames are read and answered (not counted against the 5 msg/s limit for 1 s). Returns how many "
        "connections stalled; `stalled(exchange)` counts them.",
        (EXCHANGE, Param("duration", float, None)),
        _draw_stall,
        "1 s to min(interval, 10 s)",
    ),
    Fault(
        "unstall",
        "unstall",
        "Ends the stalls of one exchange (or all) now; returns how many connections resumed.",
        (ANY_EXCHANGE,),
    ),
    Fault(
        "skip_updates",
        "skip_updates",
        "Binance: `count` update ids used up by nothing; next frame has `U = last u + count + 1`; true "
        "book unaffected, so a resync is correct. Returns the skipped id range. Bitstamp: the next "
        "`count` `diff_order_book_` frames are lost (undetectable, PROTOCOLS §2.4).",
        (EXCHANGE, SYMBOL, Param("count", int, 1)),
        _draw_skip_updates,
        "1-5 updates of a subscribed symbol",
    ),
    Fault(
        "lose_next_update",
        "lose_next_update",
        "The next frame with real changes is not sent (Binance: U gap, client book wrong unless it resyncs).",
        (EXCHANGE, SYMBOL),
        _draw_lose_next_update,
        "a subscribed symbol",
    ),
    Fault(
        "bad_frame",
        "send_bad_frame",
        "A corrupt frame to the subscribers of the symbol; returns how many streams/channels it went to. "
        "`kind` in `faults.BAD_FRAME_KINDS`: `malformed_json` (truncated), `nan_price`, `inf_price`, "
        "`zero_price`, `negative_amount`, `wrong_types` (price as a list, amount as a number; Bitstamp "
        "microtimestamp as a list), `unknown_event`. On Binance a corrupt frame uses up one update id "
        "(as if mangled in flight), so a correct client must resync; `unknown_event` uses no id and "
        "should just be ignored.",
        (EXCHANGE, SYMBOL, Param("kind")),
        _draw_bad_frame,
        "any kind, on a subscribed symbol",
    ),
    Fault(
        "request_reconnect",
        "request_reconnect",
        "Bitstamp `bts:request_reconnect` to every client. Old connections keep getting data, so "
        "make-before-break clients are served on both; with `close_after` the old ones are closed "
        '(1001 "Server maintenance") that many seconds later. Returns how many clients were asked.',
        (Param("close_after", float, None),),
        _draw_request_reconnect,
        "close_after 1-5 s",
    ),
    Fault(
        "close",
        "close_clients",
        "A close frame with any valid code, e.g. Binance's 24-hour limit `(1001, \"24h connection limit\")` "
        "or `(1008, \"Pong timeout\")`. Returns how many connections were closed.",
        (EXCHANGE, Param("code", int, 1000), Param("reason", str, "")),
        _draw_close,
        "one of the venue's own closes (Binance 1001 \"24h connection limit\" or 1008 \"Pong timeout\", "
        "Bitstamp 1001 \"Server maintenance\")",
    ),
    Fault(
        "rest_fault",
        "rest_fault",
        "The next REST requests (whose path starts with `path`, if given) get these statuses, one each: "
        "e.g. `[429, 418, 503]`; `\"drop\"` (or 0) aborts the connection unanswered. 429/418 carry "
        "`Retry-After` and act like real ones (Binance: a request before a 429's Retry-After elapses "
        "is answered 418).",
        (
            EXCHANGE,
            Param("statuses", statuses, [429], shape="429[,418,...,drop]"),
            Param("retry_after", float, None),
            Param("path", str, None),
        ),
        _draw_rest_fault,
        "429, 500, 503 or a dropped connection, Retry-After 1-3 s",
    ),
    Fault(
        "stale_snapshot",
        "stale_snapshot",
        "The next snapshot of the symbol is the book as it was `updates_ago` change events ago, with that "
        "event's `lastUpdateId` / microtimestamp (up to `market.HISTORY` = 256 events back).",
        (EXCHANGE, SYMBOL, Param("updates_ago", int, 10)),
        _draw_stale_snapshot,
        "1-20 updates ago, a subscribed symbol",
    ),
    Fault(
        "slow_rest",
        "slow_rest",
        "The next `count` responses (all when None) are held back `delay` s (reactor.callLater); content "
        "is as of the request. `delay=0` ends it.",
        (EXCHANGE, Param("delay", float), Param("count", int, None)),
        _draw_slow_rest,
        "1-5 responses, 0.5-3 s late",
    ),
    Fault("pause", "pause", "No changes generated; connections, pings, heartbeats go on."),
    Fault("resume", "resume", "Changes are generated again."),
    Fault(
        "random",
        "inject_random_fault",
        "One random recoverable fault now (from `names`, default the configured ones or every fault "
        "random mode draws); returns its one-line description.",
        (Param("names", names, None, note="comma-separated"),),
    ),
)

BY_NAME: dict[str, Fault] = {fault.name: fault for fault in FAULTS}
# Faults `--faults random` draws from: all recoverable by a correct client.
RANDOM_FAULTS = tuple(fault.name for fault in FAULTS if fault.draw is not None)


def parse_fault_names(faults: str | Iterable[str] | None) -> tuple[str, ...]:
    """None/"none" → (); "random" → every RANDOM_FAULTS; "stall,drop" → those."""
    if faults is None:
        return ()
    listed = [n.strip() for n in (faults.split(",") if isinstance(faults, str) else faults) if n.strip()]
    if listed in (["none"], []):
        return ()
    if listed == ["random"]:
        return RANDOM_FAULTS
    unknown = [n for n in listed if n not in RANDOM_FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; expected 'random', 'none' or names from {RANDOM_FAULTS}")
    return tuple(listed)


def draw(
    rng: random.Random, names: Sequence[str], venues: Sequence[Venue], interval: float
) -> tuple[str, Fault, dict[str, Any]]:
    """One random fault among `names`: (description, fault, keyword arguments). A fault that
    does not apply to the venue and symbol drawn becomes a drop."""
    fault = BY_NAME[rng.choice(names)]
    venue = rng.choice(venues)
    candidates = venue.hub.subscribed_symbols() or sorted(venue.markets)
    symbol = rng.choice(candidates) if candidates else None
    drawing = Drawing(rng, venue, symbol, interval, venues)
    if fault.draw is None:
        raise ValueError(f"{fault.name} is not drawn at random")
    drawn = fault.draw(drawing)
    if drawn is None:
        fault = BY_NAME["drop"]
        drawn = _draw_drop(drawing)
    description, kwargs = drawn
    return description, fault, kwargs
