"""Every subject, stream and bucket name, derived from one prefix, so several
aggregator deployments can share a NATS server."""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Names:
    prefix: str = "aggregator"

    def __post_init__(self) -> None:
        # Stream and bucket names allow neither dots nor wildcards.
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(
                f"prefix must be 1-32 letters, digits, '_' or '-', got {self.prefix!r}"
            )

    @property
    def summaries_stream(self) -> str:
        """JetStream stream keeping the last Summary per symbol subject."""
        return f"{self.prefix}_summaries"

    @property
    def summaries_wildcard(self) -> str:
        return f"{self.prefix}.summary.*"

    def summary_subject(self, symbol: str) -> str:
        return f"{self.prefix}.summary.{symbol}"

    @property
    def leases_bucket(self) -> str:
        """Key-value bucket: symbol -> id of the ingest daemon that owns it."""
        return f"{self.prefix}_leases"

    @property
    def demand_bucket(self) -> str:
        """Key-value bucket: `symbol.edge-id` -> present while that edge has clients for it."""
        return f"{self.prefix}_demand"

    @property
    def catalog_bucket(self) -> str:
        """Key-value bucket: exchange -> the symbols it lists (JSON), written by ingest daemons."""
        return f"{self.prefix}_catalog"


def kv_subject_prefix(bucket: str) -> str:
    """Every key-value write of `bucket` is a message on this prefix + key."""
    return f"$KV.{bucket}."
