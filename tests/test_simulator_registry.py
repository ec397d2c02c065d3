"""The fault registry and the venue interface: FAULTS.md, the control endpoint, random mode
and the Python API all agree with registry.FAULTS, and every venue is a complete Venue."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.web.test.requesthelper import DummyRequest

from aggregator.simulator import faultdoc
from aggregator.simulator.control import ControlResource
from aggregator.simulator.registry import FAULTS, RANDOM_FAULTS, REQUIRED
from aggregator.simulator.service import SimulatorService
from aggregator.simulator.venue import Venue
from aggregator.simulator.venues import VENUES
from tests.test_simulator_faults import clocked

# Valid control-endpoint values of every parameter name in the registry.
VALUES = {
    "exchange": "binance",
    "symbol": "ethbtc",
    "count": "2",
    "duration": "1.5",
    "kind": "nan_price",
    "close_after": "2",
    "code": "1001",
    "reason": "bye",
    "statuses": "429,drop",
    "retry_after": "1",
    "path": "/api",
    "updates_ago": "3",
    "delay": "0.5",
    "names": "stall,drop",
}


def param_names(fault: Any) -> set[str]:
    return {param.name for param in fault.params}


def test_faults_md_table_is_generated_from_the_registry():
    text = faultdoc.PATH.read_text(encoding="utf-8")
    assert faultdoc.render(text) == text, "run: python -m aggregator.simulator.faultdoc"
    for fault in FAULTS:
        assert f"\n| {fault.name} | `{fault.method}(" in text


def test_registry_parameters_are_the_methods_keywords():
    for fault in FAULTS:
        method = getattr(SimulatorService, fault.method)
        keywords = inspect.signature(method).parameters
        for param in fault.params:
            assert param.name in keywords, (fault.name, param.name)
            method_default = keywords[param.name].default
            # The endpoint may default what the method requires (rest_fault's statuses), not differ.
            if param.default is not REQUIRED and method_default is not inspect.Parameter.empty:
                assert method_default == param.default, (fault.name, param.name)
        assert param_names(fault) <= set(VALUES)


def _post(control: ControlResource, name: str, args: dict[str, str]) -> tuple[int, dict]:
    request = DummyRequest([b"_sim", b"fault", name.encode()])
    request.path = f"/_sim/fault/{name}".encode()
    request.method = b"POST"
    for key, value in args.items():
        request.addArg(key.encode(), value.encode())
    body = control.render_POST(request)
    return request.responseCode or 200, orjson.loads(body)


def test_control_endpoint_serves_every_registry_fault():
    with clocked(source="synthetic") as (sim, clock):
        control = ControlResource(sim)
        for fault in FAULTS:
            args = {name: VALUES[name] for name in param_names(fault)}
            code, body = _post(control, fault.name, args)
            assert code == 200 and body["ok"] and body["fault"] == fault.name, (fault.name, body)
            clock.advance(5)
            required = [p.name for p in fault.params if p.default is REQUIRED]
            if required:
                code, body = _post(control, fault.name, {})
                assert code == 400 and required[0] in body["error"], (fault.name, body)
        assert _post(control, "meteor", {})[0] == 404


@pytest.mark.parametrize("name", RANDOM_FAULTS)
def test_random_mode_draws_every_fault_on_every_venue(name: str):
    with clocked(source="synthetic", seed=11) as (sim, clock):
        descriptions = [sim.inject_random_fault([name]) for _ in range(12)]
        clock.advance(10)
    assert sim.faults_injected == descriptions
    # Without subscribers a symbol fault still finds a served symbol: never replaced by a drop.
    if name != "drop":
        assert all(not d.startswith("drop ") for d in descriptions), descriptions
    if name != "request_reconnect":  # goes to the venues that ask reconnects, whatever is drawn
        for venue in VENUES:
            assert any(venue.name in d for d in descriptions), (name, venue.name)


def test_every_venue_is_a_complete_venue():
    names = [venue.name for venue in VENUES]
    assert len(set(names)) == len(names)
    for venue in VENUES:
        assert issubclass(venue, Venue) and not inspect.isabstract(venue), venue
        assert venue.close_reasons and 0 < venue.scale_share
    sim = SimulatorService(source="synthetic")
    assert list(sim.urls) == []  # listening starts in startService
    for name in names:
        assert sim.symbols(name) and sim.connections(name) == 0 and sim.rest_log(name) == []


def test_the_service_and_sources_never_ask_which_venue():
    folder = Path(faultdoc.__file__).parent
    for module in ("service.py", "synthetic.py", "scale.py", "registry.py", "control.py", "venue.py"):
        assert "exchange ==" not in (folder / module).read_text(encoding="utf-8"), module
