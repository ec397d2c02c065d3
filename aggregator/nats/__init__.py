"""Scaling out over NATS with JetStream (issue 10): ingest daemons publish each
symbol's serialized Summary on the bus, edges serve the gRPC API from it.

`options` (the --nats* options), `names` (subjects, stream, buckets), `bus` (the
one connection), `keys` (a local view of a key-value bucket), `ingest` and
`edge` (the roles), `readiness` (an ingest daemon's gRPC health), `metrics`,
and `wiring` (the service tree tap.makeService hands over to with --nats).
"""
