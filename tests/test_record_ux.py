"""--record and --replay mistakes: one line naming the problem, no traceback."""

import gzip

from aggregator.simulator import cli
from tests.test_ux_daemon import run_twistd


def test_an_unwritable_record_directory_is_a_one_line_startup_error(tmp_path):
    (tmp_path / "file").write_text("")
    code, output = run_twistd("-n", "--pidfile=", "aggregator", "--record", "file/rec", cwd=tmp_path)
    assert code == 1
    assert output.startswith("twistd aggregator: error: --record: cannot write to file/rec: ")
    assert output.count("\n") == 1


def test_a_corrupt_recording_is_a_one_line_startup_error(tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "rec-20261206T000000-000001.jsonl.gz").write_bytes(gzip.compress(b"{oops\n"))
    code, output = run_twistd("-n", "--pidfile=", "aggregator", "--demo", "--demo-source",
                              "replay:rec", cwd=tmp_path)
    assert code == 1
    assert output.startswith("twistd aggregator: error: --demo-source: "
                             "rec/rec-20261206T000000-000001.jsonl.gz:1: corrupt line (")
    assert output.count("\n") == 1


def test_aggregator_sim_names_the_file_and_line_of_a_bad_recording(tmp_path, capsys):
    path = tmp_path / "rec-20261206T000000-000001.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"format":"aggregator-recording","version":2}\n'))
    assert cli.main(["--replay", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(
        f"aggregator-sim: {path}:1: unknown format version 2 (this simulator reads version 1)\n")


def _merger_of(*args):
    from tests.e2e import plugin

    options = plugin().options()
    options.parseOptions(["--listen", "127.0.0.1:0", *args])
    return options, plugin().makeService(options).getServiceNamed("merger")


def test_merge_every_frame_gives_a_merger_that_merges_at_each_commit():
    _, merger = _merger_of()
    assert merger._reactor is not None  # once per reactor turn
    _, merger = _merger_of("--merge-every-frame")
    assert merger._reactor is None


def test_a_demo_replay_merges_every_frame(tmp_path):
    # A replay's Summaries must not depend on how its frames were grouped into reads.
    from aggregator import recording_format

    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "rec-20261206T000000-000001.jsonl.gz").write_bytes(
        gzip.compress(recording_format.header(1765000000.0, 1765000000.0)))
    options, merger = _merger_of("--demo", "--demo-source", f"replay:{tmp_path / 'rec'}")
    assert options["merge-every-frame"]
    assert merger._reactor is None
