"""Reading the recorded cryptofeed fixtures (grammar: docs/PROTOCOLS.md §3.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

FIXTURES = Path(__file__).resolve().parent.parent / "aggregator" / "simulator" / "fixtures"


class Line(NamedTuple):
    ts: float
    kind: str  # "recv", "http", "sent", "open"
    url: str | None
    payload: str


def read(name: str) -> Iterator[Line]:
    for raw in (FIXTURES / name).read_text().split("\n"):
        if not raw or raw.startswith("configuration: "):
            continue
        if raw.startswith(("wss://", "https://")):
            url, token, rest = raw.split(" ", 2)
            if token == "<->":
                yield Line(float(rest), "open", url, "")
                continue
            ts, _, payload = rest.partition(": ")
            yield Line(float(ts), {"->": "http", "<-": "sent"}[token], url, payload)
        else:
            ts, _, payload = raw.partition(": ")
            yield Line(float(ts), "recv", None, payload)


def merged(exchange: str) -> list[Line]:
    """An exchange's websocket and HTTP lines in time order (ties: file order)."""
    lines = list(read(f"{exchange}.ws.1.0")) + list(read(f"{exchange}.http.0.0"))
    return sorted(lines, key=lambda line: line.ts)
