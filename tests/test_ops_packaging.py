"""Packaging: what `pip install .` installs, the version in one place, and
`twistd aggregator --help` documenting every option."""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from aggregator import __version__
from tests.e2e import plugin

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def test_wheel_installs_the_plugin_the_commands_and_the_dependencies(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info behind.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("aggregator-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"aggregator-{__version__}.dist-info"
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
    assert metadata["Version"] == __version__
    requires = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
                for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "prometheus-client",
            "twisted", "cryptography"} <= requires
    assert dict(entry_points["console_scripts"]) == {
        "aggregator-client": "aggregator.client:main",
        "aggregator-sim": "aggregator.simulator.cli:main",
    }
    assert "twisted/plugins/aggregator_plugin.py" in names
    assert not any(name.endswith("dropin.cache") for name in names)
    assert not any(name.startswith("twisted/plugins/__init__") for name in names)
    for module in ("health", "metrics_http", "tls", "jsonlog", "address", "grpc_service",
                   "_proto/orderbook_pb2", "_proto/orderbook_pb2_grpc"):
        assert f"aggregator/{module}.py" in names
    # Every module of the source tree ships: a package left out of setup.cfg
    # passes every in-tree test and breaks the installed daemon.
    in_tree = {str(path.relative_to(ROOT)) for path in (ROOT / "aggregator").rglob("*.py")}
    assert in_tree - names == set()
    assert any(name.startswith("aggregator/simulator/fixtures/BINANCE") for name in names)
    # `aggregator-client --proto` prints it: the API ships with the package.
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("aggregator/_proto/orderbook.proto")
    assert shipped == (ROOT / "proto" / "orderbook.proto").read_bytes()


def test_help_documents_every_option_with_its_default(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    text = subprocess.run([TWISTD, "aggregator", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())  # usage wraps long lines
    options = plugin().options()
    for name, _, default, *_ in options.optParameters:
        assert f"--{name}=" in text, name
        if default not in (None, ""):
            assert f"[default: {default}]" in flat, name
    for name, *_ in options.optFlags:
        assert f"--{name}" in text, name


def test_versions_come_from_one_place(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    daemon = subprocess.run([TWISTD, "aggregator", "--version"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert (daemon.returncode, daemon.stdout) == (0, f"aggregator {__version__}\n")
    client = subprocess.run([sys.executable, "-m", "aggregator.client", "--version"], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert client.stdout == f"aggregator-client {__version__}\n"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: aggregator.__version__"


def test_contrib_has_a_systemd_unit_and_a_dockerfile():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "contrib" / "aggregator.service")
    exec_start = unit["Service"]["ExecStart"]
    # In the foreground (systemd supervises), no pidfile in a read-only directory.
    assert "twistd --nodaemon --pidfile= aggregator" in " ".join(exec_start.split())
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    dockerfile = (ROOT / "contrib" / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "twistd" in dockerfile
    assert "HEALTHCHECK" in dockerfile
