"""What stands in front of each exchange's REST resource: request log, rate limits and the
REST faults (forced statuses, slow responses), plus the /_sim/ control endpoint; and the
quiet Site that serves it.

Limits (PROTOCOLS.md §1.6, §2.6), on the reactor clock, in fixed windows aligned to multiples
of the window length (Binance counts weight per calendar minute):

- Binance: each request costs its request weight (depth 5/25/50/250 by limit, exchangeInfo
  20, anything else 1), reported after it in `X-MBX-USED-WEIGHT-1M`. A request that would take
  the minute's weight over the budget (default 6000) is refused with 429 and `Retry-After`
  (seconds to the end of the minute) and costs nothing. A request that arrives before that
  Retry-After has elapsed is refused with 418 (IP ban) and `Retry-After` = the ban length
  (default 120 s); every request during the ban gets 418 too.
- Bitstamp: 10 000 requests per 10 minutes; over it, 429 with `Retry-After` (no bans).

Every request but the control endpoint's is logged as a `faults.RestRecord`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .clock import Clock
from .faults import RestRecord, Violation

CONTROL_PREFIX = b"/_sim/"
# Requests kept in each exchange's REST log (oldest dropped first).
LOG_SIZE = 100_000
# Status meaning "abort the connection without answering" in rest_fault.
DROP = 0


class WeightLimiter:
    """A fixed-window budget of request weight, with Retry-After and optional bans."""

    def __init__(self, limit: int | None, window: float, ban_seconds: float | None):
        if limit is not None and limit < 1:
            raise ValueError("the budget must be >= 1")
        if not window > 0:
            raise ValueError("the window must be > 0")
        self.limit = limit
        self.window = window
        self.ban_seconds = ban_seconds
        self._window_start: float | None = None
        self._used = 0
        self.retry_until = -math.inf  # end of the latest 429's Retry-After
        self.banned_until = -math.inf

    def used(self, now: float) -> int:
        """Weight used in the window containing `now`."""
        start = math.floor(now / self.window) * self.window
        if start != self._window_start:
            self._window_start, self._used = start, 0
        return self._used

    def admit(self, now: float, weight: int) -> tuple[int, float, str | None]:
        """(status, retry_after seconds, violation kind): 200 and the weight is counted, or
        429/418 and it is not."""
        if now < self.banned_until:
            return 418, self.banned_until - now, "rest_banned"
        if now < self.retry_until:
            if self.ban_seconds is not None:
                self.banned_until = now + self.ban_seconds
                return 418, self.ban_seconds, "rest_ignored_retry_after"
            return 429, self.retry_until - now, "rest_over_budget"
        used = self.used(now)
        if self.limit is not None and used + weight > self.limit:
            assert self._window_start is not None
            self.retry_until = self._window_start + self.window
            return 429, self.retry_until - now, "rest_over_budget"
        self._used = used + weight
        return 200, 0.0, None


class RestGate(Resource):
    """Wraps one exchange's REST resource; see the module docstring.

    `weigher(path, args)`: the request's cost. `used_header`: response header reporting the
    window's used weight (None: none). `error_body(status, retry_after)`: (content type, body)
    of a refused or forced-error response. `control`: the resource serving /_sim/.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        exchange: str,
        inner: Resource,
        clock: Clock,
        limiter: WeightLimiter,
        weigher: Callable[[str, Mapping[bytes, list[bytes]] | None], int] = lambda path, args: 1,
        used_header: bytes | None = None,
        error_body: Callable[[int, float], tuple[bytes, bytes]] | None = None,
        on_violation: Callable[[Violation], None] | None = None,
        control: Resource | None = None,
    ):
        super().__init__()
        self.exchange = exchange
        self._inner = inner
        self._clock = clock
        self.limiter = limiter
        self._weigher = weigher
        self._used_header = used_header
        self._error_body = error_body or _html_error
        self._on_violation = on_violation
        self.control = control
        self.log_records: deque[RestRecord] = deque(maxlen=LOG_SIZE)
        self._forced: deque[tuple[int, float | None, str | None]] = deque()
        self._delay = 0.0
        self._delay_count: int | None = None
        self._delayed: set[Any] = set()

    # ------------------------------------------------------------ faults

    def force(self, statuses: Iterable[int | str], retry_after: float | None = None, path: str | None = None) -> None:
        """Answer the next requests (of paths starting with `path`, if given) with these
        statuses, one each, in order; "drop" or 0 aborts the connection instead. A forced 429
        starts a Retry-After period (requests during it get 418 on Binance), a forced 418 a ban
        of `retry_after` seconds."""
        for status in statuses:
            code = DROP if status in ("drop", DROP) else int(status)
            if code != DROP and not 100 <= code <= 599:
                raise ValueError(f"invalid HTTP status {status!r}")
            self._forced.append((code, retry_after, path))

    def slow(self, delay: float, count: int | None = None) -> None:
        """Hold back the next `count` responses (all, when None) by `delay` seconds; 0 ends it.
        The response is computed when the request arrives (a snapshot is as of then)."""
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self._delay = delay
        self._delay_count = count if delay > 0 else None

    def stop(self) -> None:
        for call in list(self._delayed):
            if call.active():
                call.cancel()
        self._delayed.clear()

    # ------------------------------------------------------------ serving

    def render(self, request: Request) -> Any:
        path_bytes = request.path or b""
        if path_bytes.startswith(CONTROL_PREFIX) and self.control is not None:
            return self.control.render(request)
        now = self._clock.seconds()
        path = path_bytes.decode("utf-8", "replace")
        query = (request.uri or b"").partition(b"?")[2].decode("utf-8", "replace")
        weight = self._weigher(path, request.args)
        forced = self._next_forced(path)
        delay = self._take_delay()
        if forced is not None:
            status, retry_after = forced
            if status == 429:
                retry_after = retry_after if retry_after is not None else 1.0
                self.limiter.retry_until = now + retry_after
            elif status == 418:
                retry_after = retry_after if retry_after is not None else (self.limiter.ban_seconds or 60.0)
                self.limiter.banned_until = now + retry_after
            kind = None
        else:
            status, retry_after, kind = self.limiter.admit(now, weight)
        used = self.limiter.used(now)
        self.log_records.append(RestRecord(now, path, query, weight, used, status, delay))
        if kind is not None and self._on_violation is not None:
            self._on_violation(Violation(now, self.exchange, kind, f"{path}?{query} weight {weight}"))
        if status == DROP:
            self.log.info("fault: {exchange} REST {path} dropped", exchange=self.exchange, path=path)
            transport: Any = request.channel.transport  # a TCP transport, which can abort
            transport.abortConnection()
            return NOT_DONE_YET
        if self._used_header is not None:
            request.setHeader(self._used_header, str(used).encode())
        if status == 200:
            body = self._inner.render(request)
        else:
            request.setResponseCode(status)
            content_type, body = self._error_body(status, retry_after or 0.0)
            request.setHeader(b"content-type", content_type)
            if retry_after or status in (429, 418):
                request.setHeader(b"retry-after", str(max(1, math.ceil(retry_after or 0.0))).encode())
        if delay <= 0 or body is NOT_DONE_YET:
            return body
        request.setHeader(b"content-length", str(len(body)).encode())
        call = self._clock.callLater(delay, self._finish, request, body)
        self._delayed.add(call)

        def gone(_: Any) -> None:
            self._delayed.discard(call)
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    def _finish(self, request: Request, body: bytes) -> None:
        self._delayed = {c for c in self._delayed if c.active()}
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(body)
            request.finish()

    def _next_forced(self, path: str) -> tuple[int, float | None] | None:
        for i, (status, retry_after, prefix) in enumerate(self._forced):
            if prefix is None or path.startswith(prefix):
                del self._forced[i]
                return status, retry_after
        return None

    def _take_delay(self) -> float:
        delay = self._delay
        if delay > 0 and self._delay_count is not None:
            self._delay_count -= 1
            if self._delay_count <= 0:
                self._delay, self._delay_count = 0.0, None
        return delay


def _html_error(status: int, retry_after: float) -> tuple[bytes, bytes]:
    body = f"<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>\n"
    return b"text/html; charset=utf-8", body.encode()


def _discard(event: dict) -> None:
    pass


class _QuietChannel(HTTPChannel):
    """An HTTPChannel that times out idle clients without a log line: keep-alive clients of
    the simulator (treq pools connections) time out all the time, one twisted.web line each."""

    _silent = Logger(observer=_discard)  # type: ignore[arg-type]

    def timeoutConnection(self) -> None:
        # The channel is going away: silence it for the rest of its life (the timeout line and
        # a possible "Forcibly timing out" one).
        self._log = self._silent
        super().timeoutConnection()


class QuietSite(Site):
    """A Site without the per-request access log line (it would swamp the daemon's log) nor
    twisted.web's line per timed-out client."""

    noisy = False
    # A plain HTTP/1.1 channel: without TLS there is no HTTP/2 to negotiate, which is all the
    # default protocol factory adds (and its declared type).
    protocol = _QuietChannel  # type: ignore[assignment]

    def log(self, request: Any) -> None:
        pass
