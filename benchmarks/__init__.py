"""Benchmarks of the aggregator daemon: ingest, book path, latency, fan-out, memory,
time to first Summary. Run with `python -m benchmarks [--quick]` (see README, Performance).

Every process it starts (simulator, daemon, gRPC client driver, floor servers) runs on
loopback, is bounded in time and is stopped on exit.
"""

from __future__ import annotations

import asyncio
import os

# "asyncio": the floors and the driver stay on asyncio's own loop (set by `python -m
# benchmarks` when the daemon is run with --loop asyncio); children inherit it.
LOOP_ENV = "AGGREGATOR_BENCH_LOOP"


def loop_name() -> str:
    """The asyncio loop the benchmark's processes run on: "uvloop" when it is installed (the
    daemon then picks it by itself), else "asyncio"."""
    if os.environ.get(LOOP_ENV) == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def use_uvloop() -> str:
    """Make `loop_name()` this process's asyncio loop, so that the floors, the driver and the
    daemon are timed on the same loop; returns its name."""
    name = loop_name()
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name
