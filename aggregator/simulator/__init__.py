"""Built-in exchange simulator: Binance and Bitstamp market-data servers on localhost.

Serves the public websocket and REST protocols of both exchanges (PROTOCOLS.md §1, §2) from
synthetic or recorded books. Used as `twistd aggregator --demo`'s data, by end-to-end tests and
by benchmarks; standalone as `aggregator-sim`.

Layout: one `venue.Venue` per exchange (bitstamp.py, the binance package; listed in
venues.py), data sources (synthetic, recorded, scale) feeding `market.Market` books, one
fault registry (registry.py) behind random mode, the control endpoint and FAULTS.md, and
`service.SimulatorService` holding it all together.

It never imports the daemon's code: a shared misunderstanding of a protocol must not be able
to pass every test.

The recorded data includes software developed by Bryant Moscon (http://www.bryantmoscon.com/),
see fixtures/LICENSE.cryptofeed.
"""


def __getattr__(name: str):
    # Lazy, so that importing a submodule (e.g. fixtures) does not pull in the servers.
    if name == "SimulatorService":
        from .service import SimulatorService

        return SimulatorService
    raise AttributeError(name)


__all__ = ["SimulatorService"]
