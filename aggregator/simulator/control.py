"""The simulator's control endpoint, served under /_sim/ on both REST ports, so that another
process (a benchmark or soak driver) can inject faults and read counters. Loopback only, like
the rest of the simulator. Its requests are not logged, limited, delayed or faulted.

    POST /_sim/fault/<name>?param=value&...   inject a fault → {"ok": true, "fault": ..., "result": ...}
    GET  /_sim/status                         counters (SimulatorService.status())
    GET  /_sim/violations                     every rule violation recorded, oldest first
    GET  /_sim/rest_log?exchange=binance&last=100   the latest REST requests of an exchange

Fault names and parameters (SimulatorService method in brackets):

    drop               exchange?                         websocket clients only [drop_clients]
    stall              exchange, duration?               [stall]
    unstall            exchange?                         [unstall]
    skip_updates       exchange, symbol, count=1         [skip_updates]
    lose_next_update   exchange, symbol                  [lose_next_update]
    bad_frame          exchange, symbol, kind            [send_bad_frame]
    request_reconnect  close_after?                      [request_reconnect]
    close              exchange, code=1000, reason=      [close_clients]
    rest_fault         exchange, statuses=429[,418,...], retry_after?, path?   [rest_fault]
    stale_snapshot     exchange, symbol, updates_ago=10  [stale_snapshot]
    slow_rest          exchange, delay, count?           [slow_rest]
    pause / resume                                       [pause / resume]
    random             names? (comma-separated)          [inject_random_fault]

Bad parameters get 400 {"ok": false, "error": ...}; unknown names 404.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import orjson
from twisted.web.resource import Resource
from twisted.web.server import Request

if TYPE_CHECKING:
    from .service import SimulatorService

_REQUIRED = object()


class _BadRequest(Exception):
    pass


def _arg(request: Request, name: str, convert: Callable[[str], Any] = str, default: Any = _REQUIRED) -> Any:
    values = (request.args or {}).get(name.encode())
    if not values or values[0] == b"":
        if default is _REQUIRED:
            raise _BadRequest(f"missing parameter {name!r}")
        return default
    text = values[0].decode("utf-8", "replace")
    try:
        return convert(text)
    except ValueError as e:
        raise _BadRequest(f"bad parameter {name}={text!r}: {e}") from None


def _statuses(text: str) -> list[int | str]:
    return [s if s == "drop" else int(s) for s in (t.strip() for t in text.split(",")) if s]


class ControlResource(Resource):
    isLeaf = True

    def __init__(self, sim: "SimulatorService"):
        super().__init__()
        self._sim = sim

    def _json(self, request: Request, body: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps(body, default=str)

    def render_GET(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        sim = self._sim
        try:
            if path == "/_sim/status":
                return self._json(request, sim.status())
            if path == "/_sim/violations":
                return self._json(request, [dataclasses.asdict(v) for v in sim.violations])
            if path == "/_sim/rest_log":
                exchange = _arg(request, "exchange")
                last = _arg(request, "last", int, 100)
                records = sim.rest_log(exchange)[-last:] if last > 0 else []
                return self._json(request, [dataclasses.asdict(r) for r in records])
        except (_BadRequest, ValueError, KeyError) as e:
            return self._json(request, {"ok": False, "error": str(e)}, 400)
        if path.startswith("/_sim/fault/"):
            request.setHeader(b"allow", b"POST")
            return self._json(request, {"ok": False, "error": "use POST"}, 405)
        return self._json(request, {"ok": False, "error": "not found"}, 404)

    def render_POST(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        if not path.startswith("/_sim/fault/"):
            return self._json(request, {"ok": False, "error": "not found"}, 404)
        name = path[len("/_sim/fault/") :].strip("/")
        handler = getattr(self, "_fault_" + name, None)
        if handler is None:
            return self._json(request, {"ok": False, "error": f"unknown fault {name!r}"}, 404)
        try:
            result = handler(request)
        except (_BadRequest, ValueError, KeyError) as e:
            return self._json(request, {"ok": False, "error": str(e).strip("'\"")}, 400)
        return self._json(request, {"ok": True, "fault": name, "result": result})

    # ------------------------------------------------------------ one method per fault

    def _fault_drop(self, request: Request) -> Any:
        self._sim.drop_clients(_arg(request, "exchange", str, None), rest=False)
        return None

    def _fault_stall(self, request: Request) -> Any:
        return self._sim.stall(_arg(request, "exchange"), _arg(request, "duration", float, None))

    def _fault_unstall(self, request: Request) -> Any:
        return self._sim.unstall(_arg(request, "exchange", str, None))

    def _fault_skip_updates(self, request: Request) -> Any:
        return self._sim.skip_updates(_arg(request, "exchange"), _arg(request, "symbol"), _arg(request, "count", int, 1))

    def _fault_lose_next_update(self, request: Request) -> Any:
        return self._sim.lose_next_update(_arg(request, "exchange"), _arg(request, "symbol"))

    def _fault_bad_frame(self, request: Request) -> Any:
        return self._sim.send_bad_frame(_arg(request, "exchange"), _arg(request, "symbol"), _arg(request, "kind"))

    def _fault_request_reconnect(self, request: Request) -> Any:
        return self._sim.request_reconnect(_arg(request, "close_after", float, None))

    def _fault_close(self, request: Request) -> Any:
        return self._sim.close_clients(
            _arg(request, "exchange"), _arg(request, "code", int, 1000), _arg(request, "reason", str, "")
        )

    def _fault_rest_fault(self, request: Request) -> Any:
        return self._sim.rest_fault(
            _arg(request, "exchange"),
            _arg(request, "statuses", _statuses, [429]),
            _arg(request, "retry_after", float, None),
            _arg(request, "path", str, None),
        )

    def _fault_stale_snapshot(self, request: Request) -> Any:
        return self._sim.stale_snapshot(
            _arg(request, "exchange"), _arg(request, "symbol"), _arg(request, "updates_ago", int, 10)
        )

    def _fault_slow_rest(self, request: Request) -> Any:
        return self._sim.slow_rest(
            _arg(request, "exchange"), _arg(request, "delay", float), _arg(request, "count", int, None)
        )

    def _fault_pause(self, request: Request) -> Any:
        return self._sim.pause()

    def _fault_resume(self, request: Request) -> Any:
        return self._sim.resume()

    def _fault_random(self, request: Request) -> Any:
        names = _arg(request, "names", lambda t: [n for n in t.split(",") if n], None)
        return self._sim.inject_random_fault(names)
