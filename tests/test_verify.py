"""``salmap verify RUN``: records, files and row counts end to end, one table, exit 0 on a
healthy run and non-zero, naming the record or file, on damage."""

from __future__ import annotations

import json

from salmap.pipeline.cli import main
from salmap.pipeline.ledger import COMMITS
from salmap.pipeline.storage import Store
from test_export import UNIT, write_run


def _verify(run, capsys) -> tuple[int, str, str]:
    code = main(["verify", run])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_healthy_run_passes(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"))
    code, out, _ = _verify(run, capsys)
    assert code == 0, out
    assert out.splitlines()[0].split()[:2] == ["unit", "records"]
    assert f"{UNIT}  2" in out and "DAMAGED" not in out and "is healthy" in out
    assert "note: 2 file(s) of failed attempts" in out  # the strays: never read, not damage


def _records(run):
    store = Store.open(run)
    return store, [k for k in store.list(COMMITS) if k.endswith(".json")]


def test_each_kind_of_damage_is_named(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"))
    store, (first, second) = _records(run)
    rec = json.loads(store.read_bytes(second))
    store.delete(rec["files"][0])  # a committed file deleted
    raw = store.read_bytes(first)
    store.write_bytes(first, raw[: len(raw) // 2])  # a truncated record
    code, out, err = _verify(run, capsys)
    assert code == 3 and "DAMAGED" in out and "is damaged" in err
    assert f"record {store.url(first)} is damaged: not valid JSON" in out
    assert f"lists 1 file(s) that do not exist (e.g. {store.url(rec['files'][0])})" in out


def test_rows_that_disagree_with_the_files_are_named(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"))
    store, (first, _) = _records(run)
    rec = json.loads(store.read_bytes(first))
    store.write_bytes(first, json.dumps({**rec, "rows": rec["rows"] + 1}).encode())
    code, out, _ = _verify(run, capsys)
    assert code == 3
    assert f"record {store.url(first)} counts {rec['rows'] + 1} rows but its files hold " \
           f"{rec['rows']}" in out
