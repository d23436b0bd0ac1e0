"""How a run ends, as a scheduler reads it: exit codes, the closing block of failures, the error
rate, the report an interrupted run still owes, a changed config named key by key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import salmap_in_process, small_config, write_shard
from salmap.pipeline import cli
from salmap.pipeline.run import EXIT_CONFIG, EXIT_ERROR_RATE, EXIT_INCOMPLETE, EXIT_OK

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_failures_and_error_rows_end_in_a_closing_block_and_their_own_exit_codes(
        tmp_path, ray_cluster, capsys):
    """Every row an error and a missing shard: exit 3 and a closing block after the tables
    restating both; without the missing shard: exit 5 (never 0 with 100 % error rows), unless
    run.max_error_rate allows it; a changed config is refused naming the keys."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "bad-000000.tar",
                [{"__key__": f"b{i}", "jpg": os.urandom(200), "cls": b"1"} for i in range(3)])
    bad, gone = str(folder / "bad-000000.tar"), str(folder / "gone-000000.tar")
    job = tmp_path / "job.yaml"
    job.write_text(small_config([bad, gone], str(tmp_path / "out"), run_id="ends",
                                methods=[{"name": "gradient"}]))
    first = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}")
    assert first.returncode == EXIT_INCOMPLETE, first.stderr[-3000:]
    closing = first.stderr.strip().splitlines()[-5:]
    assert closing[0] == ("salmap: error rows above run.max_error_rate=0.1: tiny__gradient "
                          "100.0% (3 of 3 rows) > max"), first.stderr[-3000:]
    assert closing[1].startswith("salmap: run 'ends' ended incomplete: 1 failure(s)")
    assert closing[2].startswith("salmap: FAILED shard gone-000000 is missing")
    assert closing[3].startswith("salmap: exit 3 (incomplete)")
    assert "tiny__gradient  INCOMPLETE" in first.stdout, first.stdout  # the table says so too

    job.write_text(small_config([bad], str(tmp_path / "out"), run_id="ends",
                                methods=[{"name": "gradient"}]))
    again = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}")
    assert again.returncode == EXIT_ERROR_RATE, again.stderr[-3000:]
    assert "nothing left to do" in again.stdout or "nothing to do" in again.stdout
    assert again.stderr.strip().splitlines()[-2:] == [
        "salmap: error rows above run.max_error_rate=0.1: tiny__gradient 100.0% (3 of 3 rows) > max",
        f"salmap: exit 5 (error rate); details in {tmp_path / 'out' / 'ends'}/manifest.json"]
    manifest = json.loads((tmp_path / "out" / "ends" / "manifest.json").read_text())
    assert manifest["error_rate"] == {"max": 0.1, "units": {"tiny__gradient": 1.0},
                                      "over": ["tiny__gradient"]}
    allowed = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}", "run.max_error_rate=1")
    assert allowed.returncode == EXIT_OK, allowed.stderr[-3000:]

    other = json.loads(small_config([bad], str(tmp_path / "out"), run_id="ends",
                                    methods=[{"name": "gradient"}], targets="label"))
    other["models"][0]["input_size"] = 96
    job.write_text(json.dumps(other))
    changed = salmap_in_process(capsys, "run", str(job), f"ray.address={ray_cluster}")
    assert changed.returncode == EXIT_CONFIG
    assert "changed: models[tiny].input_size 64 -> 96; targets \"predicted\" -> \"label\"" \
        in changed.stderr, changed.stderr


def test_an_interrupt_during_the_report_leaves_it_owed_to_the_next_run(
        tmp_path, make_shards, ray_cluster, monkeypatch, capsys):
    """Ctrl-C after the last commit, while the report is written: exit 3, the manifest says the
    report is pending; the next `salmap run` has no work but writes the report (on main it
    said 'nothing to do' and never wrote it)."""
    import salmap.pipeline.report as report

    shards = make_shards(n_shards=1, per_shard=2)
    job = tmp_path / "job.yaml"
    job.write_text(small_config(shards, str(tmp_path / "out"), run_id="owed",
                                methods=[{"name": "gradient"}], run={"report": True}))
    real = report.write_report
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    args = ["run", str(job), f"ray.address={ray_cluster}"]
    assert cli.main(args) == EXIT_INCOMPLETE
    run = tmp_path / "out" / "owed"
    manifest = json.loads((run / "manifest.json").read_text())
    assert calls and manifest["status"] == "interrupted"
    assert manifest["report"] == {"status": "pending"}
    assert manifest["units"]["tiny__gradient"]["rows"] == 2  # every wave was committed
    assert not (run / "_lock.json").exists()

    monkeypatch.setattr(report, "write_report", real)
    capsys.readouterr()
    assert cli.main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "was interrupted before its report was written; writing it now" in out
    path = out.strip().splitlines()[-1].removeprefix("report: ")
    assert Path(path).is_file(), out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["report"]["status"] == "written"
    assert cli.main(args) == EXIT_OK  # owed no more: the third run writes nothing
    third = capsys.readouterr().out
    assert "already complete" in third and "writing it now" not in third
    assert "report:" not in third
