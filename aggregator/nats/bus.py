"""The daemon's one NATS connection, and the JetStream stream and buckets on it.

Connected in startService (twistd forks after makeService). nats-py retries the
first connection and every reconnection for ever; a failure is logged once per
burst. Stream and buckets are in memory (a Summary is worth nothing once stale)
and re-declared after every (re)connect: a restarted server has lost them, and
declaring an existing one with the same configuration is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import socket
from typing import Any, Awaitable, Protocol

import nats
from nats.aio.client import Client, Server
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from aggregator.nats import metrics
from aggregator.nats.options import NatsConfig
from aggregator.throttled_log import ThrottledLog


def new_daemon_id() -> str:
    """Unique per process start: host, pid, and randomness (pids are reused)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class BusListener(Protocol):
    async def bus_up(self, first: bool) -> None:
        """Connected with stream and buckets ready; `first` on the first time."""

    def bus_down(self) -> None:
        """The connection is lost (nats-py is reconnecting)."""


class Bus(Service):
    log = Logger()

    def __init__(
        self,
        config: NatsConfig,
        clock: Any,
        reconnect_wait: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.names = config.names
        self.clock = clock
        self.reconnect_wait = reconnect_wait
        # Reconnections back off exponentially up to this (no longer than a
        # lease: a bus back sooner than that loses no lease).
        self.max_backoff = min(8.0, config.lease)
        self._rng = rng or random.Random()
        self.daemon_id = ""
        self.client: Client | None = None
        self.js: JetStreamContext | None = None
        self.leases: KeyValue | None = None
        self.demand: KeyValue | None = None
        self.catalog: KeyValue | None = None
        self._ready = False
        self._ups = 0
        self._listeners: list[BusListener] = []
        self._task: asyncio.Future[None] | None = None
        self._before_close: list[Deferred[None]] = []
        self._throttled = ThrottledLog(self.log, clock)

    @property
    def connected(self) -> bool:
        return self._ready and self.client is not None and self.client.is_connected

    def add_listener(self, listener: BusListener) -> None:
        self._listeners.append(listener)

    def startService(self) -> None:
        super().startService()
        self.daemon_id = new_daemon_id()
        self._task = asyncio.ensure_future(self._connect())

    def finish_before_close(self, stopping: Deferred[None]) -> None:
        """Keep the connection until `stopping` fires: MultiService stops its
        children all at once, and Ingest and Edge hand their leases and demand
        back over this connection as they stop."""
        self._before_close.append(stopping)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopping, self._before_close = self._before_close, []
        return DeferredList(stopping).addCallback(lambda _: self._close())

    def _close(self) -> Deferred[None]:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        client, self.client = self.client, None
        self._set_ready(False)
        if client is None:
            return succeed(None)
        return Deferred.fromFuture(asyncio.ensure_future(client.close()))

    async def _connect(self) -> None:
        options: dict[str, Any] = {}
        if self.config.creds:
            options["user_credentials"] = self.config.creds
        tls = self.config.tls_context()
        if tls is not None:
            options["tls"] = tls
        self.log.info(
            "NATS: connecting to {servers} as {role} {daemon_id}",
            servers=", ".join(self.config.servers),
            role=self.config.role,
            daemon_id=self.daemon_id,
        )
        self.client = await nats.connect(
            servers=list(self.config.servers),
            name=f"aggregator {self.config.role} {self.daemon_id}",
            max_reconnect_attempts=-1,  # also retries the first connection (every reconnect_wait)
            reconnect_time_wait=self.reconnect_wait,
            reconnect_to_server_handler=self._next_server,
            connect_timeout=2,
            # A dead server must be noticed within about a lease.
            ping_interval=max(1, round(self.config.lease / 2)),
            max_outstanding_pings=2,
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            **options,
        )
        self.log.info("NATS: connected")
        await self._set_up()

    async def _set_up(self) -> None:
        """Declare stream and buckets, retrying while connected; then tell the listeners."""
        while self.client is not None and self.client.is_connected:
            try:
                await self._declare(self.client)
                break
            except Exception as error:  # noqa: BLE001 - any failure: log, wait, retry
                self._throttled.warn(
                    "setup", "NATS: cannot set up JetStream ({error}); retrying", error=repr(error)
                )
                await asyncio.sleep(self.reconnect_wait)
        else:
            return
        self._set_ready(True)
        first = self._ups == 0
        self._ups += 1
        for listener in list(self._listeners):
            await listener.bus_up(first)

    async def _declare(self, client: Client) -> None:
        js = client.jetstream()
        stream = StreamConfig(
            name=self.names.summaries_stream,
            subjects=[self.names.summaries_wildcard],
            max_msgs_per_subject=1,  # a late joiner gets the current book, nothing older
            storage=StorageType.MEMORY,
            discard=DiscardPolicy.OLD,
        )
        try:
            await js.add_stream(stream)
        except BadRequestError:
            # Exists with another configuration (another version's): use it as it is.
            await js.stream_info(stream.name or "")
        lease = self.config.lease
        self.leases = await self._bucket(js, self.names.leases_bucket, lease)
        self.demand = await self._bucket(js, self.names.demand_bucket, lease)
        self.catalog = await self._bucket(js, self.names.catalog_bucket, None)
        self.js = js

    async def _bucket(self, js: JetStreamContext, name: str, ttl: float | None) -> KeyValue:
        try:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, ttl=ttl, storage=StorageType.MEMORY)
            )
        except BadRequestError:
            # Declared by a daemon with another --nats-lease: share it, say so.
            self._throttled.warn(
                ("bucket", name),
                "NATS: bucket {bucket} exists with another configuration; using it as it is",
                bucket=name,
            )
            return await js.key_value(name)

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server, float]:
        """After a disconnection: the server tried least, after an exponential,
        jittered delay (0.25 s doubling per failed attempt, up to max_backoff)."""
        server = min(servers, key=lambda s: s.reconnects)
        delay = min(self.max_backoff, 0.25 * 2 ** min(server.reconnects, 10))
        return server, delay * self._rng.uniform(0.5, 1.0)

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        metrics.CONNECTED.set(1 if ready else 0)

    async def _error(self, error: Exception) -> None:
        self._throttled.warn("error", "NATS: {error}", error=repr(error) or type(error).__name__)

    async def _disconnected(self) -> None:
        if not self._ready:
            return
        self._set_ready(False)
        self.log.warn("NATS: disconnected; reconnecting")
        for listener in list(self._listeners):
            listener.bus_down()

    async def _reconnected(self) -> None:
        self.log.info("NATS: reconnected")
        # Not inside nats-py's reconnect task: set-up makes requests of its own.
        self.run(self._set_up())

    def run(self, coroutine: Awaitable[Any]) -> None:
        """Run `coroutine` in the background; a failure is logged, not raised."""
        future = asyncio.ensure_future(coroutine)
        future.add_done_callback(self._log_failure)

    def _log_failure(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._throttled.warn(
                ("task", type(error)), "NATS: operation failed: {error}", error=repr(error)
            )
