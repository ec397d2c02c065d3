"""Bridging asyncio (grpc.aio) into Twisted-driven tests."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from twisted.internet.defer import Deferred


def aio(awaitable: Awaitable[Any]) -> Deferred:
    """Run an asyncio awaitable on the reactor's loop; a Deferred of its result."""
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


async def within(awaitable: Awaitable[Any], seconds: float) -> Any:
    return await asyncio.wait_for(awaitable, seconds)


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` on the reactor's loop; AssertionError after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)
