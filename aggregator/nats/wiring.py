"""The service tree of a daemon started with --nats (tap.makeService hands over).

Every role first tunes the collector (--gc, aggregator/gcpause.py), as the
embedded daemon does: its pauses hold up the loop whichever role it plays.
ingest: metrics, (simulator), feeds, Merger, Bus, Ingest, and on --listen gRPC
health and reflection only — no streams: clients go to edges, so that a symbol
is watched by its lease owner only.
edge: metrics, Bus, Edge, gRPC server (API, health, reflection, limits) fed by Edge.
both: all of it in one process; its own clients are served through the bus too.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService

from aggregator.gcpause import GcTuning
from aggregator.health import Health
from aggregator.merger import Merger
from aggregator.nats.bus import Bus
from aggregator.nats.edge import Edge
from aggregator.nats.ingest import Ingest
from aggregator.nats.options import NatsConfig
from aggregator.nats.readiness import INGEST_SERVICE, HealthServer, IngestReadiness


def make_scaled_service(options: Any, config: NatsConfig, reactor: Any) -> MultiService:
    """Children start in this order and stop in reverse: gRPC first, the bus after
    Ingest and Edge (they hand their leases and demand back over it)."""
    # Imported here: aggregator.tap imports this module's package at start-up.
    from aggregator.tap import add_grpc_api, add_metrics

    root = MultiService()
    GcTuning(options["gc"], reactor).setServiceParent(root)
    add_metrics(root, options, reactor)
    merger = None
    if config.ingest:
        merger, feeds = _add_exchanges(root, options, reactor)
    bus = Bus(config, clock=reactor)
    bus.setName("bus")
    bus.setServiceParent(root)
    if merger is not None:
        ingest = Ingest(
            bus, merger, pinned=options["symbols"], max_symbols=options["max-symbols"], clock=reactor
        )
        ingest.setName("ingest")
        ingest.setServiceParent(root)
        if not config.edge:
            readiness = IngestReadiness(bus, feeds)
            health = HealthServer(
                options["listen"], Health([readiness], (INGEST_SERVICE,)), tls=options["tls"]
            )
            health.setName("grpc")
            health.setServiceParent(root)
    if config.edge:
        edge = Edge(bus, clock=reactor)
        edge.setName("edge")
        edge.setServiceParent(root)
        add_grpc_api(root, options, edge, [edge], reactor)
    return root


def _add_exchanges(root: MultiService, options: Any, reactor: Any) -> tuple[Merger, list[Any]]:
    from aggregator.tap import add_feeds, merge_clock

    feeds = add_feeds(root, options, reactor)
    # No pinned symbols here: --symbols are claimed through leases like any
    # demand, so two daemons given the same list do not both watch them.
    merger = Merger(feeds, depth=options["depth"], reactor=merge_clock(options, reactor))
    merger.setName("merger")
    merger.setServiceParent(root)
    return merger, feeds
