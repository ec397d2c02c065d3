"""The simulator's control endpoint, served under /_sim/ on every REST port, so that another
process (a benchmark or soak driver) can inject faults and read counters. Loopback only, like
the rest of the simulator. Its requests are not logged, limited, delayed or faulted.

    POST /_sim/fault/<name>?param=value&...   inject a fault → {"ok": true, "fault": ..., "result": ...}
    GET  /_sim/status                         counters (SimulatorService.status())
    GET  /_sim/violations                     every rule violation recorded, oldest first
    GET  /_sim/rest_log?exchange=binance&last=100   the latest REST requests of an exchange

Fault names and parameters are those of registry.FAULTS (the table in FAULTS.md). Bad
parameters get 400 {"ok": false, "error": ...}; unknown names 404.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import orjson
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from .registry import BY_NAME, REQUIRED, Fault, Param

if TYPE_CHECKING:
    from .service import SimulatorService

FAULT_PREFIX = "/_sim/fault/"


class _BadRequest(Exception):
    pass


def _arg(request: Request, param: Param) -> Any:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(param.name.encode())
    if not values or values[0] == b"":
        if param.default is REQUIRED:
            raise _BadRequest(f"missing parameter {param.name!r}")
        return param.default
    text = values[0].decode("utf-8", "replace")
    try:
        return param.parse(text)
    except ValueError as e:
        raise _BadRequest(f"bad parameter {param.name}={text!r}: {e}") from None


class ControlResource(Resource):
    isLeaf = True
    log = Logger()

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
                exchange = _arg(request, Param("exchange"))
                last = _arg(request, Param("last", int, 100))
                records = sim.rest_log(exchange)[-last:] if last > 0 else []
                return self._json(request, [dataclasses.asdict(r) for r in records])
        except (_BadRequest, ValueError, KeyError) as e:
            return self._json(request, {"ok": False, "error": str(e)}, 400)
        if path.startswith(FAULT_PREFIX):
            request.setHeader(b"allow", b"POST")
            return self._json(request, {"ok": False, "error": "use POST"}, 405)
        return self._json(request, {"ok": False, "error": "not found"}, 404)

    def render_POST(self, request: Request) -> bytes:
        path = (request.path or b"").decode("utf-8", "replace")
        if not path.startswith(FAULT_PREFIX):
            return self._json(request, {"ok": False, "error": "not found"}, 404)
        name = path[len(FAULT_PREFIX) :].strip("/")
        fault = BY_NAME.get(name)
        if fault is None:
            return self._json(request, {"ok": False, "error": f"unknown fault {name!r}"}, 404)
        try:
            result = self._inject(fault, request)
        except (_BadRequest, ValueError, KeyError) as e:
            return self._json(request, {"ok": False, "error": str(e).strip("'\"")}, 400)
        return self._json(request, {"ok": True, "fault": name, "result": result})

    def _inject(self, fault: Fault, request: Request) -> Any:
        kwargs = {param.name: _arg(request, param) for param in fault.params}
        if fault is not BY_NAME["random"]:  # random mode logs the fault it draws
            self.log.info("fault: {fault} {kwargs} (control endpoint)", fault=fault.name, kwargs=kwargs)
        return fault.apply(self._sim, kwargs)
