"""Scaling out over NATS with JetStream (issue 10): ingest daemons publish each
symbol's serialized Summary on the bus, edges serve the gRPC API from it.

`options` (twistd options), `names` (subjects and buckets), `bus` (the one
connection), `leases` (a local view of a key-value bucket), `ingest`, `edge`.
"""
