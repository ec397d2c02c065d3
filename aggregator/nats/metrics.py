"""Prometheus metrics of the NATS roles (default registry, like aggregator.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTED = Gauge("aggregator_nats_connected", "1 while connected to NATS with the streams set up.")
DROPPED = Counter(
    "aggregator_nats_dropped",
    "Messages received on a Summary subject that do not decode as a Summary: dropped.",
)
OWNED = Gauge("aggregator_nats_owned_symbols", "Symbols this ingest daemon holds the lease of.")
CLAIMS = Counter("aggregator_nats_claims", "Leases this ingest daemon claimed.")
LOST = Counter(
    "aggregator_nats_leases_lost", "Leases this ingest daemon found taken or expired on renewal."
)
