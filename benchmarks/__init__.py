"""Benchmarks of the aggregator daemon: ingest, book path, latency, fan-out, memory,
time to first Summary. Run with `python -m benchmarks [--quick]` (see README, Performance).

Every process it starts (simulator, daemon, gRPC client driver, floor servers) runs on
loopback, is bounded in time and is stopped on exit.
"""
