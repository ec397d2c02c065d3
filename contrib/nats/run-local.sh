#!/bin/sh
# Scaling out on one host: nats-server (JetStream) + the exchange simulator
# + 2 ingest daemons + 2 edges, all on loopback. Ctrl-C stops everything.
#
#   contrib/nats/run-local.sh            # with the virtualenv of '.[test]' on PATH
#   aggregator-client ethbtc --addr 127.0.0.1:9051   # edge 1
#   aggregator-client ethbtc --addr 127.0.0.1:9052   # edge 2
#
# Try: kill one ingest daemon (its pid is printed) and watch the other claim its
# symbols within the lease; kill an edge and the other edge's clients go on.
# Against the live exchanges, drop the simulator and the --*-url flags.
set -eu

BIN=$(dirname "$(command -v twistd)")
# From a checkout (an editable install does not put the twistd plugin in
# site-packages): twistd finds it through the repository's twisted/plugins.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
STATE=$(mktemp -d "${TMPDIR:-/tmp}/aggregator-nats.XXXXXX")
NATS=nats://127.0.0.1:4222
LEASE=${LEASE:-10}
pids=""

stop() {
    trap - INT TERM EXIT
    # Edges and ingest daemons first (they hand their leases back), the bus last.
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    wait
    rm -rf "$STATE"
}
trap stop INT TERM EXIT

start() {  # start NAME COMMAND...: run in the background, log to $STATE/NAME.log
    name=$1; shift
    "$@" >"$STATE/$name.log" 2>&1 &
    pids="$! $pids"
    echo "$name: pid $!, log $STATE/$name.log"
}

start nats-server "$BIN/nats-server" -js -a 127.0.0.1 -p 4222 -sd "$STATE/jetstream"
start simulator "$BIN/aggregator-sim" --binance-ws-port 9441 --binance-rest-port 9442 \
    --bitstamp-ws-port 9443 --bitstamp-rest-port 9444
SIM="--binance-ws-url ws://127.0.0.1:9441 --binance-rest-url http://127.0.0.1:9442
     --bitstamp-ws-url ws://127.0.0.1:9443 --bitstamp-rest-url http://127.0.0.1:9444"
sleep 1

for i in 1 2; do
    # shellcheck disable=SC2086  # $SIM is a list of flags
    start "ingest$i" "$BIN/twistd" -n --pidfile= aggregator --nats "$NATS" --nats-role ingest \
        --nats-lease "$LEASE" --listen "127.0.0.1:906$i" --metrics "127.0.0.1:910$i" $SIM
done
for i in 1 2; do
    start "edge$i" "$BIN/twistd" -n --pidfile= aggregator --nats "$NATS" --nats-role edge \
        --nats-lease "$LEASE" --listen "127.0.0.1:905$i" --metrics "127.0.0.1:911$i"
done
echo "edges: 127.0.0.1:9051 and 127.0.0.1:9052; ingest health: 127.0.0.1:9061, :9062 (Ctrl-C stops everything)"
wait
