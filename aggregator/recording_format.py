"""The recording format (docs/RECORDING.md): gzip files of JSON lines.

Shared by the daemon's writer (aggregator/recording.py) and the simulator's
reader (aggregator/simulator/replay.py); it knows nothing of either.

Line 1 of every file is the header, then one event per line:

    {"format": "aggregator-recording", "version": 1, "started": 1765000000.1, "run": 1765000000.0}
    {"t": 1765000000.5, "v": "kraken", "c": "kraken connection #1", "k": "open", "url": "ws://..."}
    {"t": ..., "v": ..., "c": ..., "k": "in", "d": "<text frame>"}      (or "b": base64 if not UTF-8)
    {"t": ..., "v": ..., "c": ..., "k": "out", "d": "<text frame>"}
    {"t": ..., "v": ..., "c": ..., "k": "close", "reason": "..."}
    {"t": ..., "v": ..., "k": "rest", "url": "http://...", "status": 200, "d": "<body>"}
"""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson

FORMAT = "aggregator-recording"
VERSION = 1
KINDS = ("open", "in", "out", "close", "rest")
# rec-<UTC start, sortable>-<sequence>.jsonl.gz: name order is time order.
FILE_PATTERN = re.compile(r"^rec-\d{8}T\d{6}-\d{6}\.jsonl\.gz$")


def header(started: float, run: float) -> bytes:
    """`run`: when the recording daemon started; connection labels are unique within a run."""
    return orjson.dumps({"format": FORMAT, "version": VERSION, "started": started, "run": run}) + b"\n"


def payload_fields(payload: bytes) -> dict[str, str]:
    """A frame or body as "d" (text, the usual case) or "b" (base64)."""
    try:
        return {"d": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b": base64.b64encode(payload).decode("ascii")}


def event_line(fields: dict[str, Any]) -> bytes:
    return orjson.dumps(fields) + b"\n"
