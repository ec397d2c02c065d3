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
