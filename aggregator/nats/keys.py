"""A local, live view of which keys of a key-value bucket exist.

Every write to a bucket is a message on `$KV.<bucket>.<key>`; a plain core
subscription sees them all as they happen (no consumer to manage, and nats-py
resubscribes by itself after a reconnect). The bucket's TTL expires keys
without any message, so the view expires them by the same clock: a key not
rewritten within `ttl` is gone. Owners rewrite well within it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

_DELETE_OPS = ("DEL", "PURGE")


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
