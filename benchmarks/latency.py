"""Send-to-Summary latency from a recording of both ends.

The simulator process keeps, for the watched symbols, the Binance book at the start of the
recording and every frame it sent afterwards (each carries the simulator's send time). The
client driver keeps, for some streams, every Summary with its arrival time. Here each
symbol's book is replayed frame by frame; after every frame its top 10 is known. A Summary
reflects the frame after which the replayed Binance top levels equal the Binance levels it
shows (the merged top 10 holds a prefix of each exchange's top 10). Per stream, Summaries
arrive in the order the daemon applied the frames, so the search for the frame behind the
next Summary starts after the frame behind the previous one: the first match is the frame
that caused it (the daemon publishes synchronously with the frame that changed the top).

latency = Summary arrival (driver's clock) − frame send time (simulator's clock); both are
time.time() on the same machine. The first Summary of a stream (the state at subscription)
and Summaries that match no recorded frame (sent before the recording started) are not
counted; how many matched is reported.
"""

from __future__ import annotations

import pickle
from typing import Any

import orjson
from sortedcontainers import SortedDict

DEPTH = 10
# How far past the previous match a Summary's frame is looked for.
MAX_SCAN = 20_000


def _replay(start: dict, frames: list[bytes], send_time_field: str) -> list[tuple[tuple, tuple, float]]:
    """[(top bids, top asks, send time)] after each frame newer than the start book."""
    bids = SortedDict({float(p): float(a) for p, a in start["bids"]})
    asks = SortedDict({float(p): float(a) for p, a in start["asks"]})
    last = start["last_id"]
    states = []
    for frame in frames:
        data = orjson.loads(frame)["data"]
        if data.get("u", 0) <= last:
            continue
        last = data["u"]
        for side, levels in ((bids, data.get("b", ())), (asks, data.get("a", ()))):
            for p, a in levels:
                p, a = float(p), float(a)
                if a > 0.0:
                    side[p] = a
                else:
                    side.pop(p, None)
        top_b = tuple((p, bids[p]) for p in bids.keys()[: -DEPTH - 1 : -1])
        top_a = tuple((p, asks[p]) for p in asks.keys()[:DEPTH])
        states.append((top_b, top_a, float(data.get(send_time_field, 0.0))))
    return states


def _binance_levels(summary_bytes: bytes) -> tuple[tuple, tuple]:
    from aggregator._proto import orderbook_pb2

    summary = orderbook_pb2.Summary.FromString(summary_bytes)
    b = tuple((l.price, l.amount) for l in summary.bids if l.exchange == "binance")
    a = tuple((l.price, l.amount) for l in summary.asks if l.exchange == "binance")
    return b, a


def match(sim_path: str, driver_path: str) -> dict[str, Any]:
    with open(sim_path, "rb") as f:
        sim = pickle.load(f)
    with open(driver_path, "rb") as f:
        streams = pickle.load(f)
    field = sim.get("send_time_field", "simSendTime")
    states = {s: _replay(sim["start"][s], frames, field) for s, frames in sim["frames"].items()}
    latencies: list[float] = []
    series: list[tuple[float, float]] = []
    summaries = unmatched = 0
    for symbol, records in streams.values():
        replay = states.get(symbol)
        if replay is None:
            continue
        pointer = 0
        previous = None
        for arrival, raw in records:
            summaries += 1
            b, a = _binance_levels(raw)
            if (b, a) == previous:
                continue  # nothing of Binance's changed: not caused by a Binance frame
            previous = (b, a)
            nb, na = len(b), len(a)
            end = min(len(replay), pointer + MAX_SCAN)
            for j in range(pointer, end):
                top_b, top_a, sent = replay[j]
                if top_b[:nb] == b and top_a[:na] == a:
                    latencies.append(arrival - sent)
                    series.append((arrival, arrival - sent))
                    pointer = j + 1
                    break
            else:
                unmatched += 1
    latencies.sort()
    series.sort()
    return {
        "summaries": summaries,
        "matched": len(latencies),
        "unmatched": unmatched,
        "frames": sum(len(v) for v in sim["frames"].values()),
        "latencies": latencies,
        "series": series,
    }


def growing(series: list[tuple[float, float]], slack: float = 0.010) -> bool:
    """True if the median latency of the last quarter of the window (by arrival) exceeds
    that of the first quarter by more than `slack` seconds: a backlog building up."""
    if len(series) < 8:
        return False
    q = len(series) // 4
    first = sorted(latency for _, latency in series[:q])
    last = sorted(latency for _, latency in series[-q:])
    return last[len(last) // 2] > first[len(first) // 2] + slack


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def summarize(latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000.0 for x in latencies]
    return {
        "samples": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "max_ms": ms[-1] if ms else None,
    }
