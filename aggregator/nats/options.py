"""The `--nats*` options of `twistd aggregator`: definitions and checks.

tap.py adds NATS_PARAMETERS to its options and calls check_nats_options()
from postOptions; the result is options["nats-config"] (None without --nats:
the embedded single-process daemon, unchanged).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage

from aggregator.nats.names import Names

ROLES = ("ingest", "edge", "both")
_SCHEMES = ("nats", "tls")

NATS_PARAMETERS: list[list[Any]] = [
    ["nats", None, "",
     "Scale out over NATS with JetStream: nats://host:port (or tls://; comma-separated "
     "for a cluster). Empty: one self-contained daemon."],
    ["nats-role", None, "both",
     "With --nats: ingest (exchanges -> NATS), edge (NATS -> gRPC clients) or both."],
    ["nats-prefix", None, "aggregator", "With --nats: prefix of every subject, stream and bucket."],
    ["nats-lease", None, 10.0,
     "With --nats: seconds an ingest daemon's claim on a symbol (and an edge's demand) "
     "lives without renewal.", float],
    ["nats-creds", None, None, "With --nats: NATS credentials file (JWT + NKey seed)."],
    ["nats-tls-ca", None, None, "With --nats: PEM CA bundle to verify the NATS server (TLS)."],
    ["nats-tls-cert", None, None, "With --nats: PEM client certificate for NATS (mutual TLS)."],
    ["nats-tls-key", None, None, "With --nats: PEM key of --nats-tls-cert."],
]


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...]
    role: str
    names: Names
    lease: float
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def ingest(self) -> bool:
        return self.role in ("ingest", "both")

    @property
    def edge(self) -> bool:
        return self.role in ("edge", "both")

    def tls_context(self) -> ssl.SSLContext | None:
        """None unless TLS is asked for (a tls:// URL or any --nats-tls-* file)."""
        wants_tls = self.tls_ca or self.tls_cert or any(s.startswith("tls://") for s in self.servers)
        if not wants_tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def parse_servers(value: str) -> tuple[str, ...]:
    """nats://host:port[,...] → the URLs; ValueError naming the bad one."""
    servers = tuple(part.strip() for part in value.split(",") if part.strip())
    if not servers:
        raise ValueError("no URL given")
    for server in servers:
        parts = urlsplit(server)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in _SCHEMES or not parts.hostname or port is None or not port:
            raise ValueError(f"expected nats://host:port or tls://host:port, got {server!r}")
    return servers


def check_nats_options(options: usage.Options) -> None:
    """Validate the --nats* options into options["nats-config"]; UsageError (one line)."""
    options["nats-config"] = None
    if not options["nats"]:
        return
    try:
        servers = parse_servers(options["nats"])
    except ValueError as error:
        raise usage.UsageError(f"--nats: {error}")
    if options["nats-role"] not in ROLES:
        raise usage.UsageError(
            f"--nats-role must be one of {', '.join(ROLES)}, got {options['nats-role']!r}"
        )
    try:
        names = Names(options["nats-prefix"])
    except ValueError as error:
        raise usage.UsageError(f"--nats-prefix: {error}")
    if not options["nats-lease"] >= 0.5:
        raise usage.UsageError("--nats-lease must be at least 0.5 seconds")
    if (options["nats-tls-cert"] is None) != (options["nats-tls-key"] is None):
        raise usage.UsageError("--nats-tls-cert and --nats-tls-key go together")
    for option in ("nats-creds", "nats-tls-ca", "nats-tls-cert", "nats-tls-key"):
        if options[option] is not None and not Path(options[option]).is_file():
            raise usage.UsageError(f"--{option}: no such file: {options[option]}")
    config = NatsConfig(
        servers=servers,
        role=options["nats-role"],
        names=names,
        lease=options["nats-lease"],
        creds=options["nats-creds"],
        tls_ca=options["nats-tls-ca"],
        tls_cert=options["nats-tls-cert"],
        tls_key=options["nats-tls-key"],
    )
    try:
        config.tls_context()
    except (OSError, ssl.SSLError) as error:
        raise usage.UsageError(f"--nats TLS: {error}")
    options["nats-config"] = config
