"""A local, live view of which keys of a key-value bucket exist, and the two
ways it is filled: a read of the whole bucket, and a subscription to its writes.

Every write to a bucket is a message on `$KV.<bucket>.<key>`; a plain core
subscription sees them all as they happen (no consumer to manage, and nats-py
resubscribes by itself after a reconnect). The bucket's TTL expires keys
without any message, so the view expires them by the same clock: a key not
rewritten within `ttl` is gone. Owners rewrite well within it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from nats.aio.msg import Msg
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from aggregator.nats.names import kv_subject_prefix

if TYPE_CHECKING:
    from aggregator.nats.bus import Bus

_DELETE_OPS = ("DEL", "PURGE")
_KV_OPERATION = "KV-Operation"


class KeyView:
    def __init__(self, ttl: float, clock: Any) -> None:
        self.ttl = ttl
        self.clock = clock
        self._seen: dict[str, tuple[float, bytes]] = {}  # key -> (last write, value)
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Called with a key each time it is written (not deleted)."""
        self._listeners.append(listener)

    def seed(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """The bucket as read after a (re)connect; writes missed meanwhile are in it."""
        now = self.clock.seconds()
        self._seen = {key: (now, value) for key, value in keys}

    def written(self, key: str, value: bytes, operation: str | None) -> None:
        if operation in _DELETE_OPS:
            self._seen.pop(key, None)
            return
        self._seen[key] = (self.clock.seconds(), value)
        for listener in list(self._listeners):
            listener(key)

    def get(self, key: str) -> bytes | None:
        """The key's value if it exists (written within ttl), else None."""
        entry = self._seen.get(key)
        if entry is None:
            return None
        if self.clock.seconds() - entry[0] > self.ttl:
            del self._seen[key]
            return None
        return entry[1]

    def keys(self) -> list[str]:
        now = self.clock.seconds()
        expired = [key for key, (at, _) in self._seen.items() if now - at > self.ttl]
        for key in expired:
            del self._seen[key]
        return list(self._seen)


async def read_bucket(bucket: KeyValue) -> list[tuple[str, bytes]]:
    """Every key of `bucket` with its value; keys gone between the two reads are left out."""
    try:
        keys = await bucket.keys()
    except NoKeysError:
        return []
    out = []
    for key in keys:
        try:
            out.append((key, (await bucket.get(key)).value or b""))
        except JetStreamError:
            continue  # deleted or expired between the two reads
    return out


def subscribe_view(bus: Bus, bucket: str, view: KeyView) -> Any:
    """Feed `view` from every write to `bucket` (see KeyView)."""
    prefix = kv_subject_prefix(bucket)

    async def written(msg: Msg) -> None:
        operation = msg.headers.get(_KV_OPERATION) if msg.headers else None
        view.written(msg.subject[len(prefix):], msg.data, operation)

    assert bus.client is not None
    return bus.client.subscribe(prefix + ">", cb=written)
