"""JSON-lines request/response over a child's stdin/stdout, for the benchmark's helper
processes (simulator runner, gRPC client driver)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from twisted.internet import stdio
from twisted.protocols.basic import LineReceiver


class CommandProtocol(LineReceiver):
    """Reads one JSON object per line from stdin, calls `handler(request)` (which may return
    a Deferred), writes the JSON reply as one line. `{"op": "quit"}` stops the reactor."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, handler: Callable[[dict], Any], on_quit: Callable[[], Any]) -> None:
        self.handler = handler
        self.on_quit = on_quit

    def lineReceived(self, line: bytes) -> None:
        from twisted.internet.defer import maybeDeferred

        if not line.strip():
            return
        request = json.loads(line)
        if request.get("op") == "quit":
            self.reply({"ok": True})
            self.on_quit()
            return
        d = maybeDeferred(self.handler, request)
        d.addCallbacks(self.reply, self._failed)

    def _failed(self, failure: Any) -> None:
        print(failure.getTraceback(), file=sys.stderr, flush=True)
        self.reply({"error": str(failure.value)})

    def reply(self, obj: Any) -> None:
        self.transport.write(json.dumps(obj).encode() + b"\n")

    def connectionLost(self, reason: Any) -> None:
        # Parent gone (stdin closed): stop too.
        self.on_quit()


def serve_stdio(handler: Callable[[dict], Any], on_quit: Callable[[], Any]) -> CommandProtocol:
    protocol = CommandProtocol(handler, on_quit)
    stdio.StandardIO(protocol)
    return protocol
