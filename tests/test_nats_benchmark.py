"""`python -m benchmarks --quick --only nats` runs end to end (simulator, nats-server,
ingest daemon, edges, drivers as separate processes on loopback) and writes its keys."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KEYS = (
    "nats_msgs_per_s_1_edge_1000",
    "nats_msgs_per_s_2_edges_1000",
    "nats_msgs_per_s_direct_1000",
    "nats_edge_cpu_1_edge",
    "nats_server_cpu_1_edge",
    "nats_server_cpu_2_edges",
    "nats_hop_p50_ms_via_edge",
    "nats_hop_p99_ms_via_edge",
    "nats_hop_p50_ms_direct",
    "nats_hop_p99_ms_direct",
)


def test_quick_nats_benchmark_writes_numbers(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "nats", "--out", str(out),
         "--logs", str(tmp_path / "logs")],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "latest.json").read_text())
    for key in KEYS:
        value = results[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    edges = results["nats_edge_cpu_2_edges"]
    assert len(edges) == 2 and all(math.isfinite(c) for c in edges)
    assert results["nats_msgs_per_s_1_edge_1000"] > 0 and results["nats_msgs_per_s_2_edges_1000"] > 0
