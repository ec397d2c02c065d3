"""Soak: the daemon under random faults for minutes, then every book checked.

    python -m benchmarks.soak [--minutes 10] [--symbols 200] [--clients 50] [--slow 5]

This process hosts the exchange simulator (scale mode) and the gRPC clients;
the daemon runs as `twistd -n aggregator` in its own process, pinned to one
core, so its RSS is its own. Every few seconds one random recoverable fault
is injected (drops, stalls, gaps, bad frames, reconnect requests, closes,
429s, stale and slow snapshots). Each client holds one stream per symbol it
watches; together they watch every symbol; `--slow` of them read one
Summary a second. At the end the faults stop, the market is paused, and every
stream's latest Summary must equal the merge of the simulator's true books.
Passes when: every book exact, daemon RSS within 10% of its value after the
warm-up, no unhandled error in the daemon's log. Not run in CI (it takes
minutes); loopback only; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import asyncioreactor

asyncioreactor.install()

import grpc  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402

from aggregator._proto import orderbook_pb2, orderbook_pb2_grpc  # noqa: E402
from aggregator.simulator import SimulatorService  # noqa: E402
from aggregator.simulator.venues import EXCHANGES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.e2e import as_tuples, expected_from_simulator  # noqa: E402

WARM_UP = 120.0  # books fill out as the random walks explore new levels
RSS_TOLERANCE = 0.10
ERROR_MARKERS = ("Unhandled error", "Traceback", "#critical]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Client:
    """One gRPC channel with one stream per symbol; slow ones dawdle between reads."""

    def __init__(self, address: str, symbols: list[str], slow: bool) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        stub = orderbook_pb2_grpc.AggregatorStub(self.channel)
        self.slow = slow
        self.latest: dict[str, orderbook_pb2.Summary] = {}
        self.received = 0
        self.errors: list[str] = []
        self.calls = [stub.BookSummary(orderbook_pb2.Request(symbol=s)) for s in symbols]
        self.tasks = [asyncio.ensure_future(self._read(s, c)) for s, c in zip(symbols, self.calls)]

    async def _read(self, symbol: str, call) -> None:
        try:
            async for summary in call:
                self.latest[symbol] = summary
                self.received += 1
                if self.slow:
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.CANCELLED:
                self.errors.append(f"{symbol}: {error.code().name} {error.details()}")

    def broken(self) -> int:
        return sum(1 for call in self.calls if call.done())

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.tasks)
        await self.channel.close()


async def soak(args: argparse.Namespace) -> int:
    sim = SimulatorService(reactor=reactor, source="scale", seed=args.seed,
                           symbols=args.symbols, rate=args.rate)
    sim.startService()
    symbols = sorted(sim.symbols("binance"))
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "daemon.log"
    daemon = subprocess.Popen(
        ["taskset", "-c", "0", str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
         f"--logfile={log_path}", "aggregator", "--listen", f"127.0.0.1:{port}",
         f"--max-symbols={len(symbols)}", f"--max-streams={len(symbols) + args.clients}",
         f"--exchanges={','.join(EXCHANGES)}",
         *[f"--{k.replace('_', '-')}={v}" for k, v in sim.urls.items()]],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    faults = LoopingCall(sim.inject_random_fault)
    clients: list[Client] = []
    rss: list[tuple[float, float]] = []
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as probe:
            await asyncio.wait_for(probe.channel_ready(), 30)
        per_client = -(-len(symbols) // args.clients)
        for i in range(args.clients):
            watched = symbols[i * per_client:(i + 1) * per_client] or symbols[:1]
            clients.append(Client(address, watched, slow=i < args.slow))
        started = time.monotonic()
        faults.start(args.fault_interval, now=False)
        print(f"soak: {len(symbols)} symbols at {args.rate:.0f} msg/s, {args.clients} clients "
              f"({args.slow} slow), faults every {args.fault_interval}s, {args.minutes} min; "
              f"daemon log {log_path}", flush=True)
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            await asyncio.sleep(5)
            rss.append((elapsed, rss_mib(daemon.pid)))
            if len(rss) % 12 == 0:  # about once a minute
                print(f"  {elapsed:5.0f}s rss {rss[-1][1]:.1f} MiB, summaries "
                      f"{sum(c.received for c in clients)}, faults {len(sim.faults_injected)}",
                      flush=True)
        faults.stop()
        sim.unstall()
        sim.slow_rest("binance", 0)
        sim.slow_rest("bitstamp", 0)
        await asyncio.sleep(10)  # let the last fault heal
        sim.pause()
        for client in clients:
            # A slow reader has a transport's worth of Summaries queued on its
            # side (gRPC flow-control window); let it drain to the newest.
            client.slow = False
        deadline = time.monotonic() + 60
        wrong: list[str] = []
        missing = len(symbols)
        while time.monotonic() < deadline:
            wrong = [s for c in clients for s in c.latest
                     if as_tuples(c.latest[s]) != expected_from_simulator(sim, s)]
            missing = len(symbols) - len({s for c in clients for s in c.latest})
            if not wrong and not missing:
                break
            await asyncio.sleep(1)
        sim.resume()
        log = log_path.read_text()
        errors = [line for line in log.splitlines() if any(m in line for m in ERROR_MARKERS)]
        warm = next(value for at, value in rss if at >= WARM_UP) if rss[-1][0] >= WARM_UP else rss[0][1]
        final = rss[-1][1]
        growth = (final - warm) / warm
        broken = sum(c.broken() for c in clients)
        stream_errors = [e for c in clients for e in c.errors]
        print(f"soak: faults injected {len(sim.faults_injected)}; summaries "
              f"{sum(c.received for c in clients)}; books wrong {len(wrong)}, never received {missing}; streams broken "
              f"{broken} {stream_errors[:3]}; RSS after warm-up {warm:.1f} MiB, final "
              f"{final:.1f} MiB ({growth:+.1%}), max {max(v for _, v in rss):.1f} MiB; "
              f"unhandled errors in the log {len(errors)}", flush=True)
        for line in errors[:10]:
            print("  " + line)
        for client in clients:
            for symbol in [s for s in wrong if s in client.latest][:5]:
                got = as_tuples(client.latest[symbol])
                expected = expected_from_simulator(sim, symbol)
                print(f"  wrong {symbol} (slow={client.slow}): best bid {got[0][:1]} vs {expected[0][:1]}, "
                      f"best ask {got[1][:1]} vs {expected[1][:1]}")
        ok = not wrong and not missing and not broken and not stream_errors and not errors and abs(growth) <= RSS_TOLERANCE
        print("soak: PASS" if ok else "soak: FAIL", flush=True)
        return 0 if ok else 1
    finally:
        if faults.running:
            faults.stop()
        for client in clients:
            await client.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        await sim.stopService().asFuture(asyncio.get_running_loop())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2000.0, help="Binance diff messages/s, all symbols")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--slow", type=int, default=5)
    parser.add_argument("--fault-interval", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    outcome: list[int] = []

    def finished(future: asyncio.Future) -> None:
        try:
            outcome.append(future.result())
        finally:
            reactor.stop()

    def run() -> None:
        asyncio.ensure_future(soak(args)).add_done_callback(finished)

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(outcome[0] if outcome else 2)


if __name__ == "__main__":
    main()
