"""JSON log lines for log shippers: `twistd ... aggregator --log-format=json`.

One JSON object per line, where twistd would have written its text log: stdout
in the foreground (-n, systemd, Docker), else --logfile (default twistd.log,
rotated by size as twistd does). Each line has `time` (UTC, ISO 8601),
`level`, `namespace`, `message` (the formatted text), `traceback` when there
is one, and the event's own fields (`exchange`, `symbol`, `reason`, ...) so a
shipper can index them without parsing the message.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, MutableMapping

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent
from twisted.python.logfile import LogFile

# Keys of legacy twisted.python.log events that are not the caller's fields.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})

# twistd's --logger takes only the name of a factory, which it calls without
# arguments: use_json_log() records here where that factory must write.
_destination: str | None = None  # a log file path; None: stdout


def json_line(event: LogEvent) -> str:
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event["log_time"], timezone.utc).isoformat(
            timespec="microseconds"
        ),
        "level": event["log_level"].name,
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY_KEYS and key not in record:
            record[key] = value
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def use_json_log(twistd_options: MutableMapping[str, Any]) -> None:
    """Make twistd log JSON lines where it would have logged text.

    Raises ValueError for what JSON lines cannot replace (--syslog, --logger)
    and for what twistd itself refuses (a daemon logging to stdout).
    """
    global _destination
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        raise ValueError("--log-format=json replaces twistd's text log; drop --logger/--syslog")
    logfile, foreground = twistd_options.get("logfile"), twistd_options.get("nodaemon")
    if logfile == "-" and not foreground:
        raise ValueError("a daemon cannot log to stdout (--logfile=-); add -n or name a file")
    if logfile == "-" or (foreground and not logfile):
        _destination = None
    else:
        _destination = logfile or "twistd.log"
    twistd_options["logger"] = f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    """The observer factory that use_json_log() names to twistd."""
    out = sys.stdout if _destination is None else LogFile.fromFullPath(_destination)
    return FileLogObserver(out, json_line)
