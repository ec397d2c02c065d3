"""The benchmark suite runs end to end (`python -m benchmarks --quick`): simulator, daemon and
client driver as separate processes on loopback, every result a number. It asserts that the
benchmark works, not a speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KEYS = (
    "ingest_msgs_per_s",
    "ingest_floor_msgs_per_s",
    "book_path_us_per_msg",
    "book_path_floor_us_per_msg",
    "bitstamp_us_per_msg",
    "bitstamp_floor_us_per_msg",
    "cryptofeed_us_per_msg",
    "fanout_msgs_per_s_1000",
    "fanout_floor_msgs_per_s_1000",
    "latency_p99_ms_5k_100",
    "latency_p999_ms_5k_1000",
    "rss_growth_pct_slow_clients",
    "first_summary_ms",
)


def test_quick_benchmark_writes_numbers(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--logs", str(tmp_path / "logs")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "latest.json").read_text())
    dated = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(dated) == 1 and json.loads(dated[0].read_text()) == results
    for key in KEYS:
        value = results[key]
        if key == "cryptofeed_us_per_msg" and value is None:
            # Only with the bench extra; otherwise skipped, and said so.
            assert "cryptofeed" in results["cryptofeed_skipped"]
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    # Per venue (dicts, not top-level numbers): every venue timed, each a positive number.
    for key in ("venue_us_per_msg", "venue_ratio_to_binance"):
        venues = results[key]
        assert set(venues) == {"binance", "bitstamp", "bybit", "coinbase", "kraken"}, (key, venues)
        for venue, value in venues.items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, venue, value)
    for key in ("python", "cpu", "date"):
        assert isinstance(results[key], str) and results[key], key
    assert results["ingest_msgs_per_s"] > 0 and results["fanout_msgs_per_s_1000"] > 0
    # The daemon's CPU share with the whole market in: a fraction of one core (a little over
    # 1 can be measured on a loaded machine), beside its floor.
    for key in ("whole_market_cpu", "whole_market_cpu_five_venues", "whole_market_floor_cpu"):
        assert 0 < results[key] <= 2, (key, results[key])
    assert results["loop"] in ("uvloop", "asyncio")
    # Every process the suite started is gone: nothing listens on its ports any more.
    assert "| benchmark |" in done.stdout
