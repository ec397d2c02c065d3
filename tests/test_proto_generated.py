"""aggregator/_proto is generated from proto/ and committed: fail if stale."""

import subprocess
import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["orderbook_pb2.py", "orderbook_pb2.pyi", "orderbook_pb2_grpc.py"]


def test_generated_modules_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iaggregator/_proto=proto",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         "proto/orderbook.proto"],
        cwd=ROOT, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "aggregator" / "_proto" / name).read_text()
        committed = (ROOT / "aggregator" / "_proto" / name).read_text()
        assert committed == fresh, (
            f"aggregator/_proto/{name} is out of date with proto/orderbook.proto; regenerate:\n"
            "python -m grpc_tools.protoc -Iaggregator/_proto=proto --python_out=. "
            "--grpc_python_out=. --pyi_out=. proto/orderbook.proto"
        )
