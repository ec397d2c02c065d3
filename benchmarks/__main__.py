"""`python -m benchmarks [--quick] [--out DIR]`: the whole suite, one table, one JSON file.

Processes (all on loopback, each stopped on exit):
  simulator  python -m benchmarks.simproc (aggregator.simulator, scale source)   CPU 1
  daemon     twistd -n --pidfile= aggregator --listen ... --metrics ...           CPU 0
  driver     python -m benchmarks.driver (grpc.aio client streams)                CPU 1
  floors     python -m benchmarks.floors ... (bare Autobahn client, bare grpc.aio
             server on CPU 0; the frame blaster on CPU 1)

The floors and the driver run on uvloop when it is installed, as the daemon does (the
results' "loop"). Every timing is printed next to a floor measured in the same run; ratios
are what to compare across runs (the machines are noisy). --quick (~80 s on a quiet
machine) uses small sizes and short windows: it proves the suite works, its numbers are not
the results. --only runs some steps (e.g. --only whole_market).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import LOOP_ENV, loop_name
from benchmarks import latency as lat
from benchmarks import procs
from benchmarks.scaleout import run_scaleout

RESULTS = Path(__file__).resolve().parent / "results"
# Input rate while streams are being opened.
QUIET_RATE = 100.0
# Whole market: the most change events a symbol makes per second (Binance's 100 ms depth
# stream's most).
MARKET_CAP = 10.0


@dataclass(frozen=True)
class Sizes:
    quick: bool
    bookpath_quick: bool
    floor_seconds: float
    ingest_symbols: tuple[int, ...]
    ingest_start: float
    ingest_factor: float
    ingest_max_steps: int
    ingest_settle: float
    ingest_window: float
    ingest_refine: bool
    latency_universe: int
    latency_rates: tuple[int, ...]
    # (label, streams, symbols)
    latency_configs: tuple[tuple[str, int, int], ...]
    latency_window: float
    record_streams: int
    fanout_streams: int
    fanout_symbols: int
    fanout_rate: float
    fanout_window: float
    slow_clients: int
    slow_fast_streams: int
    slow_fast_symbols: int
    slow_seconds: float
    slow_rate: float
    first_probes: int
    # Whole market: Binance symbols and events/s, Bitstamp pairs (2 snapshots/s each), each
    # of Bybit, Coinbase and Kraken symbols and events/s (the five-venue run), streams.
    market_binance: tuple[int, float]
    market_bitstamp_pairs: int
    market_other: tuple[int, float]
    market_streams: int
    market_warmup: float
    market_window: float


FULL = Sizes(
    quick=False,
    bookpath_quick=False,
    floor_seconds=6.0,
    ingest_symbols=(200, 1500),
    ingest_start=5000.0,
    ingest_factor=1.25,
    ingest_max_steps=10,
    ingest_settle=2.0,
    ingest_window=5.0,
    ingest_refine=True,
    latency_universe=100,
    latency_rates=(1000, 5000),
    latency_configs=(("1", 1, 1), ("100", 100, 10), ("1000", 1000, 100)),
    latency_window=10.0,
    record_streams=200,
    fanout_streams=1000,
    fanout_symbols=10,
    fanout_rate=2000.0,
    fanout_window=8.0,
    slow_clients=100,
    slow_fast_streams=100,
    slow_fast_symbols=10,
    slow_seconds=300.0,
    slow_rate=5000.0,
    first_probes=5,
    market_binance=(1500, 6000.0),
    market_bitstamp_pairs=100,
    market_other=(300, 1000.0),
    market_streams=100,
    market_warmup=5.0,
    market_window=20.0,
)

QUICK = Sizes(
    quick=True,
    bookpath_quick=True,
    floor_seconds=1.5,
    ingest_symbols=(40,),
    ingest_start=2000.0,
    ingest_factor=2.0,
    ingest_max_steps=2,
    ingest_settle=0.5,
    ingest_window=1.5,
    ingest_refine=False,
    latency_universe=20,
    latency_rates=(5000,),
    latency_configs=(("100", 10, 5), ("1000", 40, 20)),
    latency_window=2.0,
    record_streams=20,
    fanout_streams=40,
    fanout_symbols=5,
    fanout_rate=1000.0,
    fanout_window=1.5,
    slow_clients=5,
    slow_fast_streams=10,
    slow_fast_symbols=5,
    slow_seconds=4.0,
    slow_rate=1000.0,
    first_probes=1,
    market_binance=(300, 1200.0),
    market_bitstamp_pairs=20,
    market_other=(60, 200.0),
    market_streams=40,
    market_warmup=1.5,
    market_window=3.0,
)


class Run:
    def __init__(
        self, sizes: Sizes, log_dir: Path, say: Callable[[str], None], daemon_args: list[str] | None = None
    ) -> None:
        self.sizes = sizes
        self.daemon_args = daemon_args or []
        self.log_dir = log_dir
        self.say = say
        self.daemon_cpu, self.load_cpu = procs.pin_plan()
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self._n = 0

    def path(self, name: str) -> str:
        self._n += 1
        return str(self.log_dir / f"{self._n:03d}-{name}")

    # -- helpers ---------------------------------------------------------------------------

    def start_pair(self, sim_symbols: int, pinned: int, rate: float, tag: str) -> tuple[procs.Child, procs.Daemon, list[str]]:
        sim, urls = procs.start_simulator(self.log_dir, sim_symbols, rate, self.load_cpu, name=f"simulator-{tag}")
        symbols = sim.request(op="symbols")["symbols"]
        daemon = procs.Daemon(
            self.log_dir,
            urls,
            self.daemon_cpu,
            symbols=symbols[:pinned],
            max_symbols=pinned + 50,
            max_streams=2 * self.sizes.fanout_streams + 200,
            name=f"daemon-{tag}",
            extra=self.daemon_args,
        )
        deadline = time.monotonic() + 120.0
        while daemon.live_books("binance") < pinned:
            if time.monotonic() > deadline:
                raise procs.ChildFailed(f"daemon-{tag}: Binance books not live after 120 s")
            time.sleep(0.25)
        return sim, daemon, symbols

    def record(self, sim: procs.Child, driver: procs.Child, symbols: list[str], seconds: float, name: str) -> dict:
        sim.request(op="record_start", symbols=symbols)
        driver.request(op="record", on=True)
        time.sleep(seconds)
        driver.request(op="record", on=False)
        sim_path, driver_path = self.path(f"{name}-sim.pickle"), self.path(f"{name}-driver.pickle")
        sim.request(op="record_stop", path=sim_path, timeout=120)
        driver.request(op="dump", path=driver_path, timeout=120)
        result = lat.match(sim_path, driver_path)
        for p in (sim_path, driver_path):
            os.unlink(p)
        return result

    # -- 2. book path -------------------------------------------------------------------

    def bookpath(self) -> None:
        from benchmarks import bookpath

        self.say("book path: parse + apply + re-merge (+ serialize), in process")
        result = bookpath.run(self.sizes.bookpath_quick)
        self.details["bookpath"] = result
        self.results["book_path_us_per_msg"] = result["ours_us_per_msg"]
        self.results["cryptofeed_us_per_msg"] = result["cryptofeed_us_per_msg"]
        self.results["cryptofeed_version"] = result["cryptofeed_version"]
        self.results["book_path_floor_us_per_msg"] = result.get("floor_us_per_msg")
        self.results["bitstamp_us_per_msg"] = result["bitstamp_us_per_msg"]
        self.results["bitstamp_floor_us_per_msg"] = result["bitstamp_floor_us_per_msg"]
        self.results["venue_us_per_msg"] = result["venue_us_per_msg"]
        self.results["venue_ratio_to_binance"] = result["venue_ratio_to_binance"]
        if result.get("cryptofeed_skipped"):
            self.results["cryptofeed_skipped"] = result["cryptofeed_skipped"]
            self.say(f"  cryptofeed comparison skipped: {result['cryptofeed_skipped']}")

    # -- 1. ingest ------------------------------------------------------------------------

    def ingest_floor(self, symbols: int) -> dict:
        blaster = procs.Child(
            f"blaster-{symbols}",
            [procs.PYTHON, "-m", "benchmarks.floors", "blaster", "--symbols", str(symbols),
             "--messages", str(min(40_000, 20 * symbols) if not self.sizes.quick else 4000)],
            self.log_dir,
            cpu=self.load_cpu,
        )
        try:
            info = blaster.read(120.0)
            client = procs.Child(
                f"ws-floor-{symbols}",
                [procs.PYTHON, "-m", "benchmarks.floors", "ws-client", "--url", info["url"],
                 "--warmup", "1", "--duration", str(self.sizes.floor_seconds)],
                self.log_dir,
                cpu=self.daemon_cpu,
            )
            try:
                result = client.read(self.sizes.floor_seconds + 60.0)
            finally:
                client.stop()
        finally:
            blaster.stop()
        result["frame_bytes"] = info["frame_bytes"]
        return result

    def ingest(self, n_symbols: int) -> dict:
        s = self.sizes
        self.say(f"ingest, {n_symbols} symbols: floor (bare Autobahn receive + orjson decode)")
        floor = self.ingest_floor(n_symbols)
        self.say(f"  floor {floor['msgs_per_s']:,.0f} msgs/s")
        sim, daemon, symbols = self.start_pair(n_symbols, n_symbols, 1000.0, f"ingest{n_symbols}")
        out: dict[str, Any] = {"symbols": n_symbols, "floor_msgs_per_s": floor["msgs_per_s"], "floor": floor}
        dproc = procs.ProcStat(daemon.pid)
        out["rss_live_books_mb"] = dproc.rss_bytes() / 2**20
        out["live_books"] = {"binance": daemon.live_books("binance"), "bitstamp": daemon.live_books("bitstamp")}
        driver = procs.start_driver(self.log_dir, daemon.address, self.load_cpu, name=f"driver-ingest{n_symbols}")
        watched = symbols[:10]
        opened = driver.request(op="open", group="ingest", streams=10, symbols=watched, channels=10, record=10)
        if opened["errors"]:
            raise procs.ChildFailed(f"ingest streams refused: {opened['first_error']}")
        steps: list[dict] = []
        key = 'aggregator_messages_total{exchange="binance"}'

        def step(rate: float) -> dict:
            sim.request(op="rate", rate=rate)
            time.sleep(s.ingest_settle)
            m0, s0 = daemon.metrics(), sim.request(op="stats")
            c0 = dproc.cpu_seconds()
            # A scrape stalls the daemon (~70 ms with 1,500 symbols' book states): let the
            # backlog it caused drain before measuring the lag.
            time.sleep(s.ingest_settle / 2)
            rec = self.record(sim, driver, watched, s.ingest_window, f"ingest{n_symbols}-{rate:.0f}")
            m1, s1 = daemon.metrics(), sim.request(op="stats")
            c1 = dproc.cpu_seconds()
            dt = s1["t"] - s0["t"]
            sent = (s1["frames_sent"] - s0["frames_sent"]) / dt
            received = (m1.get(key, 0.0) - m0.get(key, 0.0)) / dt
            lags = lat.summarize(rec["latencies"])
            backlog0 = s0["frames_sent"] - m0.get(key, 0.0)
            backlog1 = s1["frames_sent"] - m1.get(key, 0.0)
            result = {
                "target_rate": rate,
                "sent_msgs_per_s": sent,
                "received_msgs_per_s": received,
                "backlog_start": backlog0,
                "backlog_end": backlog1,
                "daemon_cpu": (c1 - c0) / dt,
                "sim_cpu": (s1["cpu"] - s0["cpu"]) / dt,
                "lag": lags,
                "lag_samples": rec["matched"],
                "lag_growing": lat.growing(rec["series"]),
            }
            sim_limited = sent < 0.95 * rate
            # Kept up: no backlog building during the window (the end-to-end lag of the
            # watched streams does not grow and stays small); the counters agree within
            # their timing error (a scrape of 1,500 symbols' metrics takes ~0.1 s).
            keeps_up = (
                not result["lag_growing"]
                and (lags["p50_ms"] is None or lags["p50_ms"] < 50.0)
                and received >= 0.93 * sent
            )
            result["keeps_up"] = keeps_up
            result["sim_limited"] = sim_limited
            self.say(
                f"  {rate:>8,.0f}/s target: sent {sent:>8,.0f}/s, daemon {received:>8,.0f}/s, "
                f"cpu {result['daemon_cpu']:.2f}, lag p50 {_ms(lags['p50_ms'])} p99 {_ms(lags['p99_ms'])}"
                f" -> {'keeps up' if keeps_up else 'falls behind'}{' (simulator-limited)' if sim_limited else ''}"
            )
            return result

        def drain() -> None:
            sim.request(op="rate", rate=100.0)
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                st, m = sim.request(op="stats"), daemon.metrics()
                if st["frames_sent"] - m.get(key, 0.0) < 500:
                    return
                time.sleep(0.5)

        try:
            rate = s.ingest_start
            best: dict | None = None
            failed: dict | None = None
            for _ in range(s.ingest_max_steps):
                r = step(rate)
                steps.append(r)
                if not r["keeps_up"] and not r["sim_limited"] and s.ingest_refine:
                    # Once more before concluding: other load on a noisy machine can stall
                    # the daemon for a moment (its CPU share then drops below 1).
                    drain()
                    r = step(rate)
                    steps.append(r)
                if r["keeps_up"] and not r["sim_limited"]:
                    best = r
                    rate *= s.ingest_factor
                    continue
                if r["keeps_up"]:  # kept up with all the simulator could send
                    best = r
                if r["sim_limited"]:
                    out["simulator_limited"] = True
                else:
                    failed = r
                break
            if s.ingest_refine and best is not None and failed is not None:
                drain()
                r = step((best["target_rate"] + failed["target_rate"]) / 2)
                steps.append(r)
                if r["keeps_up"]:
                    best = r
            out["steps"] = steps
            if best is None:
                out["msgs_per_s"] = 0.0
            else:
                out["msgs_per_s"] = best["received_msgs_per_s"]
                out["at_target_rate"] = best["target_rate"]
                out["daemon_cpu"] = best["daemon_cpu"]
                if best["daemon_cpu"] > 0:
                    out["daemon_cpu_us_per_msg"] = best["daemon_cpu"] / best["received_msgs_per_s"] * 1e6
                out["lag"] = best["lag"]
            out["rss_end_mb"] = dproc.rss_bytes() / 2**20
        finally:
            driver.stop()
            daemon.stop()
            sim.stop()
        out["ratio_to_floor"] = out["msgs_per_s"] / floor["msgs_per_s"] if floor["msgs_per_s"] else None
        self.say(
            f"  ingest {n_symbols} symbols: {out['msgs_per_s']:,.0f} msgs/s "
            f"= {out['ratio_to_floor']:.0%} of the floor; RSS with {n_symbols} live books {out['rss_live_books_mb']:.0f} MiB"
        )
        return out

    # -- 3/4. latency and fan-out -------------------------------------------------------------

    def stream_window(self, sim: procs.Child, daemon: procs.Daemon, driver: procs.Child, group: str,
                      watched: list[str], seconds: float, name: str) -> dict:
        dproc = procs.ProcStat(daemon.pid)
        m0, c0, d0 = daemon.metrics(), dproc.cpu_seconds(), driver.request(op="counts")
        rec = self.record(sim, driver, watched, seconds, name)
        m1, c1, d1 = daemon.metrics(), dproc.cpu_seconds(), driver.request(op="counts")
        dt = d1["t"] - d0["t"]
        delivered = (d1["groups"][group]["received"] - d0["groups"][group]["received"]) / dt
        sent = procs.metric(m1, "aggregator_summaries_sent_total") - procs.metric(m0, "aggregator_summaries_sent_total")
        conflated = procs.metric(m1, "aggregator_summaries_conflated_total") - procs.metric(m0, "aggregator_summaries_conflated_total")
        cpu = (c1 - c0) / dt
        out = {
            "delivered_msgs_per_s": delivered,
            "daemon_cpu": cpu,
            "daemon_cpu_us_per_summary": cpu / delivered * 1e6 if delivered else None,
            "conflated_share": conflated / (conflated + sent) if conflated + sent else 0.0,
            "driver_cpu": (d1["cpu"] - d0["cpu"]) / dt,
            "matched": rec["matched"],
            "unmatched": rec["unmatched"],
            "errors": d1["groups"][group]["errors"],
        }
        out.update(lat.summarize(rec["latencies"]))
        return out

    def latency(self) -> None:
        s = self.sizes
        self.say(f"latency: {s.latency_universe} symbols ingested, streams over some of them")
        extra = max(10, 2 * s.first_probes)
        sim, daemon, symbols = self.start_pair(s.latency_universe + extra, s.latency_universe, 1000.0, "latency")
        driver = procs.start_driver(self.log_dir, daemon.address, self.load_cpu, name="driver-latency")
        runs: dict[str, Any] = {}
        try:
            for rate in s.latency_rates:
                for label, n_streams, n_symbols in s.latency_configs:
                    watched = symbols[:n_symbols]
                    # Streams are opened while the input is quiet: a saturated daemon admits
                    # new streams slowly (~10/s at 5,000 msgs/s in with 1,000 streams).
                    sim.request(op="rate", rate=QUIET_RATE)
                    opened = driver.request(op="open", group="lat", streams=n_streams, symbols=watched,
                                            channels=max(1, n_streams // 10), record=min(n_streams, s.record_streams),
                                            wait=90, timeout=120)
                    if opened["errors"]:
                        raise procs.ChildFailed(f"latency streams refused: {opened['first_error']}")
                    sim.request(op="rate", rate=rate)
                    time.sleep(1.0 if s.quick else 2.0)
                    r = self.stream_window(sim, daemon, driver, "lat", watched, s.latency_window, f"lat-{rate}-{label}")
                    r.update(rate=rate, streams=n_streams, symbols=n_symbols)
                    key = f"{rate // 1000}k_{label}"
                    runs[key] = r
                    self.say(
                        f"  {rate:>5}/s in, {n_streams:>4} streams over {n_symbols:>3} symbols: "
                        f"p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} p99.9 {_ms(r['p999_ms'])} "
                        f"({r['samples']} samples), {r['delivered_msgs_per_s']:,.0f} Summaries/s, "
                        f"conflated {r['conflated_share']:.0%}, daemon cpu {r['daemon_cpu']:.2f}"
                    )
                    driver.request(op="close", group="lat", timeout=60)
            self.details["latency"] = runs
            p100 = runs.get("5k_100", {})
            p1000 = runs.get("5k_1000", {})
            self.results["latency_p99_ms_5k_100"] = p100.get("p99_ms")
            self.results["latency_p999_ms_5k_1000"] = p1000.get("p999_ms")
            self.slow_clients(sim, daemon, driver, symbols)
            self.first_summary(sim, driver, symbols[s.latency_universe:])
        finally:
            driver.stop()
            daemon.stop()
            sim.stop()

    def fanout_floor(self) -> dict:
        s = self.sizes
        self.say("fan-out floor: bare grpc.aio server, pre-serialized Summary")
        server = procs.Child("grpc-floor", [procs.PYTHON, "-m", "benchmarks.floors", "grpc-server"],
                             self.log_dir, cpu=self.daemon_cpu)
        out: dict[str, Any] = {}
        try:
            info = server.read(60.0)
            out["summary_bytes"] = info["summary_bytes"]
            driver = procs.start_driver(self.log_dir, f"127.0.0.1:{info['port']}", self.load_cpu, name="driver-floor")
            sproc = procs.ProcStat(server.pid)
            try:
                for label, n in (("1", 1), (str(s.fanout_streams), s.fanout_streams)):
                    driver.request(op="open", group="floor", streams=n, symbols=["floor"],
                                   channels=max(1, n // 10), wait=90, timeout=120)
                    time.sleep(1.0)
                    d0, c0 = driver.request(op="counts"), sproc.cpu_seconds()
                    time.sleep(s.fanout_window)
                    d1, c1 = driver.request(op="counts"), sproc.cpu_seconds()
                    dt = d1["t"] - d0["t"]
                    rate = (d1["groups"]["floor"]["received"] - d0["groups"]["floor"]["received"]) / dt
                    cpu = (c1 - c0) / dt
                    out[label] = {"msgs_per_s": rate, "server_cpu": cpu, "driver_cpu": (d1["cpu"] - d0["cpu"]) / dt,
                                  "server_cpu_us_per_msg": cpu / rate * 1e6 if rate else None}
                    self.say(f"  {n:>4} streams: {rate:,.0f} msgs/s, server cpu {cpu:.2f}, driver cpu {out[label]['driver_cpu']:.2f}")
                    driver.request(op="close", group="floor", timeout=60)
            finally:
                driver.stop()
        finally:
            server.stop()
        return out

    def fanout(self) -> None:
        s = self.sizes
        floor = self.fanout_floor()
        self.say(f"fan-out: {s.fanout_streams} streams over {s.fanout_symbols} symbols, {s.fanout_rate:,.0f} msgs/s in")
        sim, daemon, symbols = self.start_pair(s.fanout_symbols, s.fanout_symbols, QUIET_RATE, "fanout")
        driver = procs.start_driver(self.log_dir, daemon.address, self.load_cpu, name="driver-fanout")
        try:
            opened = driver.request(op="open", group="fan", streams=s.fanout_streams, symbols=symbols,
                                    channels=max(1, s.fanout_streams // 10),
                                    record=min(s.fanout_streams, s.record_streams), wait=90, timeout=120)
            if opened["errors"]:
                raise procs.ChildFailed(f"fan-out streams refused: {opened['first_error']}")
            sim.request(op="rate", rate=s.fanout_rate)
            time.sleep(1.0 if s.quick else 2.0)
            r = self.stream_window(sim, daemon, driver, "fan", symbols, s.fanout_window, "fanout")
        finally:
            driver.stop()
            daemon.stop()
            sim.stop()
        floor_n = floor[str(s.fanout_streams)]
        r["floor"] = floor
        r["ratio_to_floor"] = r["delivered_msgs_per_s"] / floor_n["msgs_per_s"] if floor_n["msgs_per_s"] else None
        self.details["fanout"] = r
        self.results["fanout_msgs_per_s_1000"] = r["delivered_msgs_per_s"]
        self.results["fanout_floor_msgs_per_s_1000"] = floor_n["msgs_per_s"]
        self.results["fanout_conflated_share"] = r["conflated_share"]
        self.results["fanout_daemon_cpu"] = r["daemon_cpu"]
        self.say(
            f"  {r['delivered_msgs_per_s']:,.0f} Summaries/s = {r['ratio_to_floor']:.0%} of the floor; "
            f"daemon cpu {r['daemon_cpu']:.2f} ({_num(r['daemon_cpu_us_per_summary'])} µs/Summary, floor "
            f"{_num(floor_n['server_cpu_us_per_msg'])}); conflated {r['conflated_share']:.0%}; "
            f"latency p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])}"
        )

    # -- 5. memory with slow clients ------------------------------------------------------------

    def slow_clients(self, sim: procs.Child, daemon: procs.Daemon, driver: procs.Child, symbols: list[str]) -> None:
        s = self.sizes
        watched = symbols[: s.slow_fast_symbols]
        self.say(
            f"slow clients: {s.slow_fast_streams} fast streams over {s.slow_fast_symbols} symbols at "
            f"{s.slow_rate:,.0f} msgs/s in; then + {s.slow_clients} slow ones for {s.slow_seconds:.0f} s"
        )
        sim.request(op="rate", rate=QUIET_RATE)
        driver.request(op="open", group="fast", streams=s.slow_fast_streams, symbols=watched,
                       channels=max(1, s.slow_fast_streams // 10), record=s.slow_fast_streams, wait=90, timeout=120)
        sim.request(op="rate", rate=s.slow_rate)
        time.sleep(1.0 if s.quick else 2.0)
        window = min(s.latency_window, 15.0)
        before = self.stream_window(sim, daemon, driver, "fast", watched, window, "slow-before")
        opened = driver.request(op="open", group="slow", streams=s.slow_clients, symbols=watched,
                                channels=s.slow_clients, slow=1.0, wait=90, timeout=120)
        if opened["errors"]:
            raise procs.ChildFailed(f"slow streams refused: {opened['first_error']}")
        dproc = procs.ProcStat(daemon.pid)
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        interval = 1.0 if s.quick else 5.0
        measure_at = s.slow_seconds - window - 1.0
        during: dict | None = None
        while time.monotonic() - start < s.slow_seconds:
            samples.append((time.monotonic() - start, dproc.rss_bytes() / 2**20))
            if during is None and time.monotonic() - start >= measure_at:
                during = self.stream_window(sim, daemon, driver, "fast", watched, window, "slow-during")
                continue
            time.sleep(interval)
        samples.append((time.monotonic() - start, dproc.rss_bytes() / 2**20))
        if during is None:
            during = self.stream_window(sim, daemon, driver, "fast", watched, window, "slow-during")
        counts = driver.request(op="counts")
        driver.request(op="close", group="slow", timeout=60)
        driver.request(op="close", group="fast", timeout=60)
        # Baseline: once the slow streams' transport buffers have filled (the first tenth).
        settle = s.slow_seconds / 10
        base = [rss for t, rss in samples if t <= settle] or [samples[0][1]]
        tail = [rss for t, rss in samples if t >= s.slow_seconds - max(settle, 2 * interval)] or [samples[-1][1]]
        base_mb, end_mb = _median(base), _median(tail)
        growth = (end_mb / base_mb - 1.0) * 100.0
        ratio = during["p99_ms"] / before["p99_ms"] if during["p99_ms"] and before["p99_ms"] else None
        self.details["slow_clients"] = {
            "rss_samples_mb": samples,
            "rss_start_mb": base_mb,
            "rss_end_mb": end_mb,
            "rss_max_mb": max(rss for _, rss in samples),
            "fast_before": before,
            "fast_during": during,
            "p99_ratio": ratio,
            "slow_received": counts["groups"].get("slow", {}).get("received"),
        }
        self.results["rss_growth_pct_slow_clients"] = growth
        self.results["slow_clients_fast_p99_ratio"] = ratio
        self.say(
            f"  RSS {base_mb:.1f} -> {end_mb:.1f} MiB ({growth:+.1f}%), max {max(r for _, r in samples):.1f}; "
            f"fast p99 {_ms(before['p99_ms'])} without, {_ms(during['p99_ms'])} with slow clients"
        )

    # -- 6. time to first Summary -----------------------------------------------------------------

    def first_summary(self, sim: procs.Child, driver: procs.Child, fresh: list[str]) -> None:
        s = self.sizes
        sim.request(op="rate", rate=1000.0)
        out: dict[str, Any] = {}
        for delay in (0.0, 0.05):
            sim.request(op="slow_rest", delay=delay)
            probes = []
            for _ in range(s.first_probes):
                symbol = fresh.pop(0)
                time.sleep(0.6)  # not behind the previous probe's UNSUBSCRIBE (Binance pacing)
                probes.append(driver.request(op="first", symbol=symbol, wait=10.0, timeout=30.0))
            sim.request(op="slow_rest", delay=0.0)
            key = f"{int(delay * 1000)}ms"
            out[key] = {
                "probes": probes,
                "first_ms": _median([p["first_ms"] for p in probes if p["first_ms"] is not None]),
                "levels_ms": _median([p["levels_ms"] for p in probes if p["levels_ms"] is not None]),
                "both_ms": _median([p["both_ms"] for p in probes if p["both_ms"] is not None]),
            }
            self.say(
                f"first Summary, snapshot delay {key}: any {_ms(out[key]['first_ms'])}, with levels "
                f"{_ms(out[key]['levels_ms'])}, both exchanges {_ms(out[key]['both_ms'])}"
            )
        self.details["first_summary"] = out
        self.results["first_summary_ms"] = out["0ms"]["both_ms"]
        self.results["first_summary_ms_50ms_snapshot"] = out["50ms"]["both_ms"]

    # -- 7. the whole market ------------------------------------------------------------------------

    def whole_market(self) -> None:
        s = self.sizes
        n, rate = s.market_binance
        pairs = s.market_bitstamp_pairs
        loads = [f"binance={n}:{rate}:{MARKET_CAP}", f"bitstamp={pairs}:{2.0 * pairs}"]
        two = self.market_run("two", loads, ("binance", "bitstamp"))
        # Bybit, Coinbase and Kraken each list a few hundred of the pairs (their majors, so
        # the busiest generated symbols) whose book channels at the depths the daemon
        # subscribes change a few times a second on a typical pair: ~1,000 msgs/s over 300
        # symbols each, with Binance's heavy-tailed shape and cap so that only the venues differ.
        others, other_rate = s.market_other
        loads += [f"{venue}={others}:{other_rate}:{MARKET_CAP}" for venue in ("bybit", "coinbase", "kraken")]
        five = self.market_run("five", loads, ("binance", "bitstamp", "bybit", "coinbase", "kraken"))
        self.details["whole_market"] = {"two_venues": two, "five_venues": five}
        self.results["whole_market_cpu"] = two["daemon_cpu"]
        self.results["whole_market_floor_cpu"] = two["floor"]["cpu"]
        self.results["whole_market_cpu_five_venues"] = five["daemon_cpu"]

    def market_floor(self, tag: str, urls: dict, rates: dict[str, dict[str, float]]) -> dict:
        """The bare Autobahn + orjson client (floors.py) subscribed to the whole Binance and
        Bitstamp market of the simulator, before the daemon starts: reading the same input at
        the same rate, on the daemon's CPU."""
        s = self.sizes
        streams = [f"{symbol}@depth@100ms" for symbol in rates["binance"]]
        # 750 streams a connection: under Binance's 1,024 (the daemon too opens two for 1,500).
        connections: list[tuple[str, list[str]]] = [
            (urls["binance_ws_url"] + "/stream",
             [json.dumps({"method": "SUBSCRIBE", "params": streams[i:i + 750], "id": i})])
            for i in range(0, len(streams), 750)
        ]
        connections.append((urls["bitstamp_ws_url"], [
            json.dumps({"event": "bts:subscribe", "data": {"channel": f"order_book_{pair}"}})
            for pair in rates["bitstamp"]
        ]))
        spec = Path(self.path(f"market-floor-{tag}.json"))
        spec.write_text(json.dumps(connections))
        warmup, window = s.market_warmup, s.market_window / 2
        client = procs.Child(
            f"market-floor-{tag}",
            [procs.PYTHON, "-m", "benchmarks.floors", "ws-client", "--connections", str(spec),
             "--warmup", str(warmup), "--duration", str(window)],
            self.log_dir,
            cpu=self.daemon_cpu,
        )
        try:
            result: dict[str, Any] = client.read(warmup + window + 60.0)
        finally:
            client.stop()
        self.say(f"  floor: bare Autobahn + orjson cpu {result['cpu']:.3f} at {result['msgs_per_s']:,.0f} msgs/s")
        return result

    def market_run(self, tag: str, loads: list[str], exchanges: tuple[str, ...]) -> dict[str, Any]:
        s = self.sizes
        n, rate = s.market_binance
        self.say(f"whole market, {len(exchanges)} venues: {' '.join(loads)}; {s.market_streams} streams")
        sim, urls = procs.start_simulator(self.log_dir, n, rate, self.load_cpu, name=f"simulator-market-{tag}", loads=loads)
        driver: procs.Child | None = None
        daemon: procs.Daemon | None = None
        try:
            rates = sim.request(op="rates")
            symbols = list(rates["binance"])  # busiest first; every venue lists a prefix of them
            # Only for Binance and Bitstamp (the floor client speaks their subscriptions).
            floor = self.market_floor(tag, urls, rates) if set(exchanges) <= {"binance", "bitstamp"} else None
            daemon = procs.Daemon(
                self.log_dir, urls, self.daemon_cpu, symbols=symbols, max_symbols=n + 50,
                max_streams=s.market_streams + 100, name=f"daemon-market-{tag}", extra=self.daemon_args,
                exchanges=exchanges,
            )
            deadline = time.monotonic() + 180.0
            for exchange in exchanges:
                while daemon.live_books(exchange) < len(rates[exchange]):
                    if time.monotonic() > deadline:
                        raise procs.ChildFailed(f"daemon-market-{tag}: {exchange} books not live after 180 s")
                    time.sleep(0.5)
            driver = procs.start_driver(self.log_dir, daemon.address, self.load_cpu, name=f"driver-market-{tag}")
            watched = _spread(symbols, s.market_streams)
            opened = driver.request(op="open", group="market", streams=s.market_streams, symbols=watched,
                                    channels=10, wait=90, timeout=120)
            if opened["errors"]:
                raise procs.ChildFailed(f"whole-market streams refused: {opened['first_error']}")
            time.sleep(s.market_warmup)
            dproc = procs.ProcStat(daemon.pid)
            # Metrics scraped outside the CPU window: a scrape of 1,500 books' metrics costs
            # the daemon ~0.1 s, which is not the market's cost.
            m0, tm0 = daemon.metrics(), time.monotonic()
            s0, d0 = sim.request(op="stats"), driver.request(op="counts")
            c0, t0 = dproc.cpu_seconds(), time.monotonic()
            time.sleep(s.market_window)
            c1, t1 = dproc.cpu_seconds(), time.monotonic()
            rss = dproc.rss_bytes()
            s1, d1 = sim.request(op="stats"), driver.request(op="counts")
            m1, tm1 = daemon.metrics(), time.monotonic()
        finally:
            if driver is not None:
                driver.stop()
            if daemon is not None:
                daemon.stop()
            sim.stop()
        sim_dt, driver_dt = s1["t"] - s0["t"], d1["t"] - d0["t"]
        venues: dict[str, Any] = {}
        for exchange in exchanges:
            v0, v1 = s0["venues"][exchange], s1["venues"][exchange]
            received = procs.metric(m1, "aggregator_messages_total", exchange=exchange) - procs.metric(
                m0, "aggregator_messages_total", exchange=exchange)
            venues[exchange] = {
                "symbols": len(rates[exchange]),
                "target_msgs_per_s": sum(rates[exchange].values()),
                "generated_per_s": (v1["generated"] - v0["generated"]) / sim_dt,
                "skipped": v1["skipped"] - v0["skipped"],
                "received_msgs_per_s": received / (tm1 - tm0),
            }
        received_total = sum(v["received_msgs_per_s"] for v in venues.values())
        # The simulator fell behind its rates (it shares its CPU with the driver, and the
        # machine with others): the daemon's share is then of a smaller market.
        limited = any(v["skipped"] or v["generated_per_s"] < 0.97 * v["target_msgs_per_s"] for v in venues.values())
        cpu = (c1 - c0) / (t1 - t0)
        out = {
            "daemon_cpu": cpu,
            "floor": floor,
            "received_msgs_per_s": received_total,
            "simulator_limited": limited,
            "venues": venues,
            "streams": s.market_streams,
            "watched_symbols": len(set(watched)),
            "summaries_per_s": (d1["groups"]["market"]["received"] - d0["groups"]["market"]["received"]) / driver_dt,
            "sim_cpu": (s1["cpu"] - s0["cpu"]) / sim_dt,
            "window_s": t1 - t0,
            "daemon_rss_mb": rss / 2**20,
        }
        per_venue = ", ".join(f"{e} {v['received_msgs_per_s']:,.0f}" for e, v in venues.items())
        self.say(
            f"  daemon cpu {cpu:.3f} of a core at {received_total:,.0f} msgs/s in ({per_venue}); "
            f"{out['summaries_per_s']:,.0f} Summaries/s out; "
            f"simulator cpu {out['sim_cpu']:.2f}{' (simulator-limited)' if limited else ''}"
        )
        return out


def _spread(symbols: list[str], count: int) -> list[str]:
    """`count` of the busiest-first `symbols`: the busiest third in rank order (Bitstamp's
    pairs among them), the rest evenly over the quieter tail."""
    busiest = min(count // 3, len(symbols))
    tail = symbols[busiest:]
    rest = count - busiest
    return symbols[:busiest] + [tail[i * len(tail) // rest] for i in range(rest)] if tail and rest else symbols[:count]


def _median(values: list) -> Any:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[len(values) // 2]


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} ms"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "—" if v is None else format(v, fmt)


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": f"{model} ({os.cpu_count()} CPUs)", "python": platform.python_version(), "loop": loop_name()}


def table(results: dict, details: dict) -> str:
    from benchmarks.report import render

    return render(results, details)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short windows (~80 s): a smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="where latest.json and a dated copy go (default benchmarks/results, "
                             "or benchmarks/results/quick with --quick)")
    parser.add_argument("--logs", type=Path, default=None, help="process logs (default: a temporary directory)")
    parser.add_argument("--only", default="", help="comma-separated subset: bookpath,ingest,latency,fanout,whole_market,nats")
    parser.add_argument("--daemon-args", default="",
                        help="extra daemon options, e.g. '--gc python' (compare runs with and without)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="aggregator-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    procs.install_cleanup()
    daemon_args = shlex.split(args.daemon_args)
    if "--loop=asyncio" in daemon_args or "--loop asyncio" in " ".join(daemon_args):
        # The daemon kept off uvloop: so do the floors and the driver (children inherit this).
        os.environ[LOOP_ENV] = "asyncio"
    run = Run(sizes, log_dir, say, daemon_args)
    if run.load_cpu is not None:
        # This process (analysis between windows) stays off the daemon's CPU too.
        os.sched_setaffinity(0, {run.load_cpu})
    say(f"benchmarks ({'quick' if sizes.quick else 'full'}); logs in {log_dir}; "
        f"daemon on CPU {run.daemon_cpu}, load on CPU {run.load_cpu}; {loop_name()} loop")
    ok = True
    try:
        if not only or "bookpath" in only:
            run.bookpath()
        if not only or "ingest" in only:
            ingest = {}
            for n in sizes.ingest_symbols:
                ingest[str(n)] = run.ingest(n)
            run.details["ingest"] = ingest
            headline = ingest[str(max(sizes.ingest_symbols))]
            run.results["ingest_msgs_per_s"] = headline["msgs_per_s"]
            run.results["ingest_floor_msgs_per_s"] = headline["floor_msgs_per_s"]
            run.results["ingest_symbols"] = headline["symbols"]
            run.results["rss_mb_live_books"] = headline["rss_live_books_mb"]
            if "200" in ingest:
                run.results["ingest_msgs_per_s_200"] = ingest["200"]["msgs_per_s"]
                run.results["ingest_floor_msgs_per_s_200"] = ingest["200"]["floor_msgs_per_s"]
        if not only or "latency" in only:
            run.latency()
        if not only or "fanout" in only:
            run.fanout()
        if not only or "whole_market" in only:
            run.whole_market()
        if not only or "nats" in only:
            run_scaleout(run)  # benchmarks/scaleout.py
    except BaseException:  # a failure, or stopped (SIGINT/SIGTERM): no results file
        ok = False
        raise
    finally:
        procs.stop_all()
        if ok:
            now = _dt.datetime.now(_dt.timezone.utc)
            document = {
                **run.results,
                **machine(),
                "date": now.isoformat(timespec="seconds"),
                "mode": "quick" if sizes.quick else "full",
                "command": "python -m benchmarks" + (" --quick" if sizes.quick else "")
                + (f" --daemon-args {shlex.quote(args.daemon_args)}" if args.daemon_args else ""),
                "pinning": {"daemon_cpu": run.daemon_cpu, "load_cpu": run.load_cpu},
                "wall_seconds": time.monotonic() - started,
                "details": run.details,
            }
            text = table(run.results, run.details)
            print(text)
            latest = out_dir / "latest.json"
            latest.write_text(json.dumps(document, indent=1, default=float) + "\n")
            dated = out_dir / f"{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
            shutil.copyfile(latest, dated)
            (out_dir / "latest.md").write_text(text + "\n")
            say(f"results: {latest} (and {dated.name})")
        if args.logs is None and ok:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
