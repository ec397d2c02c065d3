# twistd imports every plugin module to list them: import nothing heavy here and
# never twisted.internet.reactor. aggregator.tap is imported only when the
# "aggregator" subcommand is used.
from twisted.application.service import ServiceMaker

aggregator = ServiceMaker(
    "aggregator",
    "aggregator.tap",
    "Merged Binance + Bitstamp order book streamed over gRPC",
    "aggregator",
)
