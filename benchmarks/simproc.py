"""The simulator process of the benchmarks: the scale source (Binance-shaped diff frames
for N generated symbols, each frame carrying the simulator's send time), controlled over
stdin/stdout with JSON lines.

    python -m benchmarks.simproc --symbols 200 --rate 5000
    python -m benchmarks.simproc --load binance=1500:6000:10 --load bitstamp=100:200

(--load VENUE=SYMBOLS:RATE[:CAP], whole-market mode: each venue its own first SYMBOLS
symbols at RATE events/s in total, heavy-tailed per symbol up to CAP/s if given)
prints {"urls": {...}} once listening, then answers requests:

    {"op": "rate", "rate": R}          total Binance change events/s from now on (with
                                       --load: every venue's rate scaled alike)
    {"op": "stats"}                    frames sent, events generated, CPU seconds (Binance;
                                       per venue under "venues")
    {"op": "rates"}                    per venue, each listed symbol's events/s
    {"op": "record_start", "symbols": [...]}   start keeping these symbols' frames
    {"op": "record_stop", "path": P}   write the start books + frames to P (pickle)
    {"op": "sample_frames", "count": N, "path": P}  next N frames (any symbol) to P
    {"op": "slow_rest", "delay": S}    every REST answer held back S seconds
    {"op": "quit"}

Rates are changed through the scale source's `speed` (events/s = rate × speed), so the
generator neither bursts nor skips at a change.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import sys
import time
from typing import Any



from benchmarks.procs import ProcStat


def parse_load(text: str) -> tuple[str, Any]:
    """VENUE=SYMBOLS:RATE[:CAP] -> (venue, scale.VenueLoad)."""
    from aggregator.simulator.scale import VenueLoad

    venue, _, spec = text.partition("=")
    parts = spec.split(":")
    if not venue or len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--load {text!r}: expected VENUE=SYMBOLS:RATE[:CAP]")
    cap = float(parts[2]) if len(parts) == 3 else None
    return venue, VenueLoad(int(parts[0]), float(parts[1]), cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simproc")
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--bitstamp-rate", type=float, default=0.0)
    parser.add_argument("--tick", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", action="append", default=[], type=parse_load,
                        help="whole-market mode: VENUE=SYMBOLS:RATE[:CAP] (repeat per venue)")
    args = parser.parse_args(argv)
    loads = dict(args.load)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver, LogLevel, FilteringLogObserver, LogLevelFilterPredicate

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )

    from aggregator.simulator import SimulatorService
    from aggregator.simulator import binance as sim_binance
    from aggregator.simulator.venues import EXCHANGES

    # The scale source caps catch-up per tick at rate × 0.1 s: a high base rate keeps that
    # cap out of the way (the speed multiplier sets the real rate). With --load the loads are
    # the rates at speed 1 (a whole market's rates are high enough for that cap).
    base_rate = loads["binance"].rate if "binance" in loads else 100_000.0
    sim = SimulatorService(
        reactor=reactor,
        source="scale",
        symbols=max([load.symbols for load in loads.values()], default=args.symbols),
        rate=base_rate,
        bitstamp_rate=args.bitstamp_rate * base_rate / args.rate if args.rate > 0 else 0.0,
        speed=1.0 if loads else args.rate / base_rate,
        tick=args.tick,
        seed=args.seed,
        scale_loads=loads or None,
        # The daemon reads the weight budget from exchangeInfo: generous, so that 1,500
        # snapshots at start-up are not paced over many minutes (the benchmark measures the
        # data path, not the REST limiter).
        rest_weight_limit=10_000_000,
        bitstamp_request_limit=None,
        max_messages_per_second=None,
    )
    scale = getattr(sim, "_scale", None)
    if scale is None:
        raise SystemExit("simulator has no scale source (aggregator.simulator.scale)")
    send_time_field = getattr(sim_binance, "SEND_TIME_FIELD", "simSendTime")
    process = ProcStat()
    recording: dict[str, Any] = {"symbols": set(), "frames": {}, "start": {}}
    sampling: dict[str, Any] = {"left": 0, "frames": [], "path": None}

    def on_frame(exchange: str, symbol: str, frame: bytes) -> None:
        if exchange != "binance":
            return
        if symbol in recording["symbols"]:
            recording["frames"][symbol].append(frame)
        if sampling["left"] > 0:
            sampling["frames"].append(frame)
            sampling["left"] -= 1
            if sampling["left"] == 0:
                with open(sampling["path"], "wb") as f:
                    pickle.dump(sampling["frames"], f)
                sampling["frames"] = []

    sim.add_frame_listener(on_frame)

    def stats() -> dict[str, Any]:
        s = sim.scale_stats() or {}
        return {
            "t": time.time(),
            "frames_sent": sim.frames_sent("binance"),
            "generated": s.get("binance", {}).get("generated"),
            "skipped": s.get("binance", {}).get("skipped"),
            "played": s.get("played"),
            "cpu": process.cpu_seconds(),
            "rss": process.rss_bytes(),
            "connections": sim.connections("binance"),
            "venues": {
                exchange: {
                    "frames_sent": sim.frames_sent(exchange),
                    "generated": s.get(exchange, {}).get("generated"),
                    "skipped": s.get(exchange, {}).get("skipped"),
                }
                for exchange in EXCHANGES
            },
        }

    def handle(request: dict) -> Any:
        op = request["op"]
        if op == "rate":
            scale.speed = float(request["rate"]) / base_rate
            return {"ok": True, "speed": scale.speed}
        if op == "stats":
            return stats()
        if op == "rates":
            return {exchange: {symbol: rate * scale.speed for symbol, rate in rates.items()}
                    for exchange, rates in scale.symbol_rates.items()}
        if op == "record_start":
            symbols = set(request["symbols"])
            start = {}
            for symbol in symbols:
                market = sim.market("binance", symbol)
                bids, asks = market.book.levels()
                start[symbol] = {"last_id": market.last_update_id, "bids": bids, "asks": asks}
            recording.update(symbols=symbols, frames={s: [] for s in symbols}, start=start)
            return {"ok": True, "t": time.time()}
        if op == "record_stop":
            data = {
                "start": recording["start"],
                "frames": recording["frames"],
                "send_time_field": send_time_field,
            }
            recording.update(symbols=set(), frames={}, start={})
            with open(request["path"], "wb") as f:
                pickle.dump(data, f)
            return {"ok": True, "frames": sum(len(v) for v in data["frames"].values())}
        if op == "sample_frames":
            sampling.update(left=int(request["count"]), frames=[], path=request["path"])
            return {"ok": True}
        if op == "sample_done":
            return {"done": sampling["left"] == 0}
        if op == "slow_rest":
            for exchange in ("binance", "bitstamp"):
                sim.slow_rest(exchange, float(request["delay"]))
            return {"ok": True}
        if op == "symbols":
            return {"symbols": sim.symbols("binance")}
        raise ValueError(f"unknown op {op!r}")

    def quit() -> None:
        if reactor.running:
            reactor.stop()

    from benchmarks.ipc import serve_stdio

    # Each market keeps an undo log of its last change events, for the stale-snapshot fault,
    # which the benchmarks do not use; with 1,500 symbols it costs the generator 2.5x its
    # throughput (20,000 vs 8,000 events/s on one core), so it is switched off here.
    for exchange in EXCHANGES:
        for symbol in sim.symbols(exchange):
            market = sim.market(exchange, symbol)
            if getattr(market, "_history", None) is not None:
                market._history = None
    sim.startService()
    # The load generator's own collector pauses (gen2 scans of the simulated books took
    # ~150-200 ms every few seconds at 8,000 msgs/s) would show up as the daemon's latency:
    # everything built so far is frozen and the cyclic collector is off for the run
    # (bounded in time; reference counting still frees the frames).
    gc.collect()
    gc.freeze()
    gc.disable()
    serve_stdio(handle, quit).reply({"urls": sim.urls})
    reactor.addSystemEventTrigger("before", "shutdown", sim.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
