"""The CLI around a run: --version, init (packaged example configs), shards' skipped files,
and quiet output (salmap's own lines; Ray's with --verbose)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import salmap.pipeline
from conftest import jpeg_bytes, small_config, write_shard
from salmap.pipeline import cli
from salmap.pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
# the line Ray's C++ core worker writes for every Ray Data actor pool (Ray 2.60), verbatim
CORE_WORKER_LINE = (
    "[2026-11-30 02:15:08,587 E 15620 15620] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(Explainer))' and ID: 'eab3ed90a71fb4d2078dde7501000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    project = (REPO / "pyproject.toml").read_text()
    assert f'version = "{salmap.pipeline.__version__}"' in project
    assert capsys.readouterr().out.strip() == f"salmap {salmap.pipeline.__version__}"


def test_init_writes_the_packaged_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    packaged = Path(salmap.pipeline.__file__).parent / "configs"
    for name in ("demo.yaml", "example.yaml"):
        assert (tmp_path / "configs" / name).read_text() == (packaged / name).read_text()
    # the checkout's configs/ is a real folder (no link: archives and file systems without
    # links keep it) holding the same files as the packaged pipeline/configs/
    assert not (REPO / "configs").is_symlink() and (REPO / "configs").is_dir()
    top = sorted(p.name for p in (REPO / "configs").iterdir())
    assert top == sorted(p.name for p in packaged.glob("*.yaml")) == ["demo.yaml", "example.yaml"]
    for name in top:
        assert (REPO / "configs" / name).read_bytes() == (packaged / name).read_bytes(), (
            f"configs/{name} differs from pipeline/configs/{name} (the copy `salmap init` "
            "writes): edit both, or copy one onto the other")
    (tmp_path / "configs" / "demo.yaml").write_text("# mine\n")
    assert main(["init"]) == 0
    assert (tmp_path / "configs" / "demo.yaml").read_text() == "# mine\n"
    assert "kept" in capsys.readouterr().out
    # outside a checkout (no configs/ here), a bare `salmap run` finds the packaged demo
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli._default_config() == str(packaged / "demo.yaml")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"salmap.pipeline.configs" = ["*.yaml"]' in pyproject  # the wheel carries them
    # (tests/test_packaging.py)


def test_shards_prints_what_it_skipped(tmp_path, capsys):
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(0))
    (images / "b.gif").write_bytes(b"GIF89a")
    (images / "notes.txt").write_text("x")
    assert main(["shards", str(tmp_path / "images"), str(tmp_path / "shards")]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 file(s) that are not .jpeg/.jpg/.png/.webp images (.gif, .txt): " in out
    assert "cats/b.gif" in out and "cats/notes.txt" in out
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["cats__a.cls", "cats__a.jpg"]
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == {"cats": 0}


def test_stderr_filter_drops_only_the_benign_lines():
    """fd 2 as C++ code writes it: the known line is dropped, the rest passes in order."""
    code = f"""
import os, sys
from salmap.pipeline.logs import StderrFilter, stderr_is_tty
f = StderrFilter().start()
os.write(2, b"first\\n")
os.write(2, {CORE_WORKER_LINE + chr(10)!r}.encode())
print("python stderr", file=sys.stderr, flush=True)
os.write(2, b"[2026-11-30 E 1 1] core_worker.cc:99: a real error\\nlast without newline")
f.stop()
print(len(f.dropped), stderr_is_tty())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])})
    assert p.returncode == 0, p.stderr
    assert p.stderr == ("first\npython stderr\n[2026-11-30 E 1 1] core_worker.cc:99: a real "
                        "error\nlast without newline")
    assert p.stdout.strip() == "1 False"


def console_handlers_printing(logger: logging.Logger, level: int, msg: str) -> list:
    """The console handlers that would print ``msg`` logged at ``level`` on ``logger``: the
    decision logging makes (logger levels, propagation, handler levels and filters) without
    writing anywhere. Ray's handlers keep the stream they were made with, which under pytest
    can be an earlier test's capture, so the test does not read a stream."""
    if not logger.isEnabledFor(level):
        return []
    record = logger.makeRecord(logger.name, level, __file__, 0, msg, (), None)
    printing, node = [], logger
    while node is not None:
        for h in node.handlers:
            console = isinstance(h, logging.StreamHandler) and "File" not in type(h).__name__
            if console and record.levelno >= h.level and h.filter(record):
                printing.append(h)
        node = node.parent if node.propagate else None
    return printing


def test_quiet_ray_logging_keeps_errors_and_verbose_brings_the_rest_back():
    from salmap.pipeline.logs import quiet_ray_logging

    data_log = logging.getLogger("ray.data._internal.execution.streaming_executor")
    token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    progress_log = logging.getLogger("ray.data._internal.progress")
    try:
        quiet_ray_logging(False)
        assert console_handlers_printing(data_log, logging.ERROR, "a real ray data error")
        for log, level in ((data_log, logging.INFO), (data_log, logging.WARNING),
                           (token_log, logging.WARNING), (progress_log, logging.WARNING)):
            assert not console_handlers_printing(log, level, "noise"), (log.name, level)
        quiet_ray_logging(True)
        for log in (data_log, token_log, progress_log):
            assert console_handlers_printing(log, logging.WARNING, "back with --verbose")
    finally:
        quiet_ray_logging(True)


@pytest.mark.slow
def test_salmap_run_prints_only_salmaps_lines(tmp_path, ray_cluster):
    samples = [{"__key__": f"img{i}", "jpg": jpeg_bytes(i)} for i in range(2)]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "q-000000.tar", samples)
    job = tmp_path / "job.yaml"
    job.write_text(small_config([str(tmp_path / "shards" / "q-000000.tar")], str(tmp_path / "runs"),
                                run_id="quiet", methods=[{"name": "gradient"}]))
    p = subprocess.run([sys.executable, "-m", "salmap.pipeline.cli", "run", str(job),
                        f"ray.address={ray_cluster}"], capture_output=True, text=True,
                       timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == "", p.stderr  # no token notice, no Ray Data INFO, no core_worker line
    salmap_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("salmap:")]
    assert any("committed wave" in ln for ln in salmap_lines)
    assert any(ln.startswith("salmap: tiny__gradient: 2/2 samples (100%)") for ln in salmap_lines)
    assert "INFO" not in p.stdout and "WARNING" not in p.stdout and "core_worker" not in p.stdout


# -- secrets in URLs (issue 21) ----------------------------------------------------------------
def test_redact_masks_url_credentials_and_signed_query_values():
    from salmap.pipeline.redact import redact, redact_obj

    assert redact("s3://AKIA123:hunter2@bucket/a-000000.tar missing") == \
        "s3://***@bucket/a-000000.tar missing"
    assert redact("see https://u:p@h.example/x and http://tok@h/y") == \
        "see https://***@h.example/x and http://***@h/y"
    signed = "https://b.s3.amazonaws.com/k.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc123&v=2"
    assert redact(signed) == "https://b.s3.amazonaws.com/k.tar?X-Amz-Credential=***" \
                             "&X-Amz-Signature=***&v=2"
    assert redact("plain text, a=b, s3://bucket/key") == "plain text, a=b, s3://bucket/key"
    assert redact_obj({"input": {"shards": ["s3://k:hunter2@b/x.tar"]}, "n": 3}) == \
        {"input": {"shards": ["s3://***@b/x.tar"]}, "n": 3}


def test_redacting_filter_cleans_log_records_and_their_tracebacks():
    from salmap.pipeline.redact import RedactingFilter

    logger = logging.getLogger("salmap.test_redact")
    try:
        raise OSError("cannot open s3://k:hunter2@b/x.tar")
    except OSError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                                   "reading %s failed", ("s3://k:hunter2@b/x.tar",),
                                   sys.exc_info())
    assert RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "hunter2" not in text and "s3://***@b/x.tar" in text


def test_the_stored_config_has_no_credentials(tmp_path):
    from salmap.pipeline.config import load_config
    from salmap.pipeline.run import _public_config

    job = tmp_path / "job.yaml"
    job.write_text(small_config(["s3://AKIAXX:hunter2@bucket/s-000000.tar"], str(tmp_path / "o")))
    public = json.dumps(_public_config(load_config(str(job))))
    assert "hunter2" not in public and "s3://***@bucket/s-000000.tar" in public


def test_a_shard_url_with_credentials_is_never_echoed(tmp_path):
    """The start-up storage check fails on the URL; its error line names it, secret redacted
    (on main the line carried 'AKIAXX:hunter2@bucket')."""
    job = tmp_path / "job.yaml"
    job.write_text(small_config(["s3://AKIAXX:hunter2@bucket/data/s-000000.tar"],
                                str(tmp_path / "out"),
                                storage={"endpoint": "http://127.0.0.1:9", "retries": 1,
                                         "connect_timeout_s": 1, "request_timeout_s": 1}))
    p = subprocess.run([sys.executable, "-m", "salmap.pipeline.cli", "run", str(job)],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])})
    assert p.returncode in (1, 2), p.stderr
    assert "hunter2" not in p.stdout + p.stderr and "AKIAXX" not in p.stdout + p.stderr
    assert "s3://***@bucket/data" in p.stderr, p.stderr


def test_max_error_rate_is_a_share(tmp_path):
    from salmap.pipeline.config import ConfigError, load_config

    job = tmp_path / "job.yaml"
    job.write_text(small_config(["x.tar"], str(tmp_path / "o")))
    assert load_config(str(job)).run.max_error_rate == 0.1
    with pytest.raises(ConfigError, match="run.max_error_rate must be a share between 0 and 1"):
        load_config(str(job), ["run.max_error_rate=1.5"])


def test_changed_keys_names_what_changed_for_the_unit():
    from salmap.pipeline.config_diff import changed_keys

    old = {"models": [{"name": "r18", "source": "torchvision:resnet18", "input_size": 64}],
           "methods": [{"name": "ig", "params": {"steps": 8}}], "targets": "predicted",
           "metrics": [], "resources": {"precision": "fp32", "batch_size": 4},
           "run": {"map_dtype": "float16"}, "input": {"label_key": "cls"}}
    new = json.loads(json.dumps(old))
    new["models"][0]["input_size"] = 96
    new["methods"][0]["params"]["steps"] = 16
    new["resources"]["batch_size"] = 32  # not part of what makes the rows
    assert changed_keys(old, new, "r18__ig") == ["methods[ig].params.steps 8 -> 16",
                                                 "models[r18].input_size 64 -> 96"]
    assert changed_keys(None, new, "r18__ig") == []


def test_redact_masks_credentials_quoted_without_their_scheme():
    from salmap.pipeline.redact import redact

    assert redact('Invalid bucket name "AKIAXX:hunter2@bucket": must match') == \
        'Invalid bucket name "***@bucket": must match'
    assert redact("mail me at someone@example.com") == "mail me at someone@example.com"


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.mark.parametrize("argv, says", [
    (["shards", "{tmp}/nofolder/", "{tmp}/out"], "salmap: shards: {tmp}/nofolder/ is not a folder"),
    (["shards", "{tmp}/empty", "{tmp}/out"], "salmap: shards: no images found in {tmp}/empty ("),
    (["shards", "{tmp}/flat", "{tmp}/out", "--labels", "{tmp}/no.csv"],
     "salmap: shards: --labels {tmp}/no.csv: No such file or directory"),
    (["shards", "{tmp}/flat", "{tmp}/out", "--per-shard", "0"], "salmap: shards: --per-shard 0"),
    (["export"], "salmap: export: the following arguments are required: run, --format"),
    (["nosuchcommand"], "salmap: argument command: invalid choice: 'nosuchcommand'"),
    (["read", "{tmp}/run", "--head", "x"], "salmap: read: argument --head: invalid int value"),
    (["report", "{tmp}/norun"], "salmap: report: {tmp}/norun: not found (no salmap run there"),
    (["run", "{tmp}/missing.yaml"], "salmap: config error: config file not found"),
])
def test_every_usage_error_is_one_salmap_line_with_exit_2(tmp_path, capsys, argv, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes(0))
    tmp = str(tmp_path)
    assert _exit([a.format(tmp=tmp) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(says.format(tmp=tmp)), err
    assert not (tmp_path / "norun").exists() and not (tmp_path / "out").exists()


def test_shards_names_a_flat_folder_without_labels_and_counts_one_shard(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg_bytes(0))
    assert main(["shards", str(tmp_path / "flat"), str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"note: {tmp_path / 'flat'} has no class sub-folders and no --labels")
    assert out[1] == f"wrote 1 shard: {tmp_path / 's' / 'shard-000000.tar'}"
    (tmp_path / "flat" / "b.jpg").write_bytes(jpeg_bytes(1))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.jpg,1\nb.jpg,2\n")
    assert main(["shards", str(tmp_path / "flat"), str(tmp_path / "t"), "--per-shard", "1",
                 "--labels", str(labels)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 2 shards: {tmp_path / 't' / 'shard-000000.tar'} ... "
        f"{tmp_path / 't' / 'shard-000001.tar'}"]


def test_read_maps_writes_the_maps_without_the_table(tmp_path, capsys):
    from test_export import write_run

    run = write_run(str(tmp_path / "run"))
    assert main(["read", run]) == 0
    assert "k00000" in capsys.readouterr().out  # the rows' table
    assert main(["read", run, "--maps", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith(f"wrote {tmp_path / 'm.npz'}: maps [")
    assert (tmp_path / "m.npz").is_file()
