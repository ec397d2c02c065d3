"""Starting, talking to and stopping the benchmark's processes.

Every child is started in its own process group, optionally pinned to one CPU, and
registered so that `stop_all()` (called on exit, on SIGTERM/SIGINT and after each
benchmark) terminates it and, if it does not go within a few seconds, kills it.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_children: list["Child"] = []


class ChildFailed(RuntimeError):
    pass


class ProcStat:
    """CPU seconds and resident memory of a process, from /proc (Linux; no dependency)."""

    _TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, pid: int | str = "self") -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        """User + system CPU time so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        # After the command: state is field 3; utime, stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / self._TICKS

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * self._PAGE


def cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pin_plan() -> tuple[int | None, int | None]:
    """(daemon CPU, load CPU): the daemon alone on the first CPU, everything else on the
    second. With a single CPU nothing is pinned."""
    available = cpus()
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A child process; with `ipc=True` it speaks JSON lines on stdin/stdout."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        cpu: int | None = None,
        ipc: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.ipc = ipc
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)

        def preexec() -> None:
            os.setpgrp()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if ipc else subprocess.DEVNULL,
            stdout=subprocess.PIPE if ipc else self._log,
            stderr=self._log,
            cwd=str(ROOT),
            env=full_env,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self._buffer = b""
        _children.append(self)

    # -- JSON lines ----------------------------------------------------------------

    def read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{self.name}: no answer within {timeout:.0f} s (log: {self.log_path})")
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(min(left, 1.0)):
                    if self.proc.poll() is not None:
                        raise ChildFailed(f"{self.name} exited with {self.proc.returncode} (log: {self.log_path})")
                    continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ChildFailed(f"{self.name} closed its output (log: {self.log_path})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise ChildFailed(f"{self.name}: {reply['error']} (log: {self.log_path})")
        return reply

    def request(self, timeout: float = 30.0, **request: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    # -- life -----------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                if self.ipc and self.proc.stdin is not None:
                    try:
                        self.proc.stdin.write(b'{"op": "quit"}\n')
                        self.proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
                    try:
                        self.proc.wait(timeout=min(timeout, 3.0))
                    except subprocess.TimeoutExpired:
                        pass
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        pass
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(timeout=5.0)
            except ProcessLookupError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._log.close()
        if self in _children:
            _children.remove(self)


def stop_all() -> None:
    for child in list(reversed(_children)):
        try:
            child.stop()
        except Exception as error:  # keep stopping the others
            print(f"benchmarks: stopping {child.name}: {error}", file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


# -- the three kinds of processes --------------------------------------------------------


def start_simulator(
    log_dir: Path, symbols: int, rate: float, cpu: int | None, name: str = "simulator", loads: Sequence[str] = ()
) -> tuple[Child, dict]:
    """`loads`: simproc's --load values (whole-market mode), which then set the rates."""
    argv = [PYTHON, "-m", "benchmarks.simproc", "--symbols", str(symbols), "--rate", str(rate)]
    for load in loads:
        argv += ["--load", load]
    child = Child(name, argv, log_dir, cpu=cpu)
    hello = child.read(timeout=120.0)
    return child, hello["urls"]


class Daemon:
    """`twistd -n aggregator` pointed at the simulator, with the metrics endpoint on."""

    def __init__(
        self,
        log_dir: Path,
        urls: dict,
        cpu: int | None,
        symbols: Sequence[str] = (),
        max_symbols: int = 100,
        max_streams: int = 1100,
        name: str = "daemon",
        extra: Sequence[str] = (),
        exchanges: Sequence[str] = ("binance", "bitstamp"),
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [
            str(Path(PYTHON).with_name("twistd")),
            "-n",
            "--pidfile=",
            "aggregator",
            "--listen", self.address,
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            # The venues measured here; never a live venue's default URL.
            "--exchanges", ",".join(exchanges),
        ]
        for exchange in exchanges:
            argv += [f"--{exchange}-ws-url", urls[f"{exchange}_ws_url"],
                     f"--{exchange}-rest-url", urls[f"{exchange}_rest_url"]]
        argv += [
            "--max-symbols", str(max(max_symbols, len(symbols))),
            "--max-streams", str(max_streams),
        ]
        if symbols:
            argv += ["--symbols", ",".join(symbols)]
        argv += list(extra)  # e.g. --gc python, to compare a daemon option's effect
        self.child = Child(name, argv, log_dir, cpu=cpu, ipc=False)
        self.pid = self.child.pid
        self._wait_listening(60.0)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise ChildFailed(f"daemon exited with {self.child.proc.returncode} (log: {self.child.log_path})")
            try:
                self.metrics()
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.1)
        raise ChildFailed(f"daemon not listening after {timeout:.0f} s (log: {self.child.log_path})")

    def metrics(self) -> dict[str, float]:
        """The Prometheus text page as {"name{labels}": value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                pass
        return values

    def live_books(self, exchange: str = "binance") -> int:
        prefix = "aggregator_book_state{"
        live = 0
        for key, value in self.metrics().items():
            if key.startswith(prefix) and f'exchange="{exchange}"' in key and 'aggregator_book_state="live"' in key:
                live += value == 1.0
        return live

    def stop(self) -> None:
        self.child.stop(timeout=10.0)


def start_driver(log_dir: Path, address: str, cpu: int | None, name: str = "driver") -> Child:
    child = Child(name, [PYTHON, "-m", "benchmarks.driver", "--address", address], log_dir, cpu=cpu)
    child.read(timeout=60.0)
    return child


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    if labels:
        inside = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return values.get(f"{name}{{{inside}}}", 0.0)
    return values.get(name, 0.0)
