"""A config is code: one read from s3:// that names a package.module:callable model source is
refused, before anything is imported, unless the caller opts in (issue 21)."""

from __future__ import annotations

import json
import sys
import uuid

import pytest
from salmap.pipeline.cli import build_parser, main
from salmap.pipeline.config import ConfigError, load_config


@pytest.fixture
def s3():
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("cfg")
    yield f"http://{host}:{port}", fs
    server.stop()


@pytest.fixture
def code_config(tmp_path, monkeypatch, s3):
    """An s3:// config whose model source is a module that leaves a marker when imported."""
    endpoint, fs = s3
    module = f"w21_code_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def make(**kw):\n    import torch\n    return torch.nn.Linear(1, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"input": {"shards": ["s3://cfg/shard-000000.tar"]},
           "models": [{"name": "m", "source": "torchvision:resnet18", "weights": "none"},
                      {"name": "x", "source": f"{module}:make"}],
           "methods": [{"name": "gradient"}]}
    with fs.open_output_stream("cfg/job.yaml") as out:
        out.write(json.dumps(cfg).encode())
    (tmp_path / "job.yaml").write_text(json.dumps(cfg))
    yield "s3://cfg/job.yaml", endpoint, marker, module, tmp_path / "job.yaml"
    sys.modules.pop(module, None)


def test_an_s3_config_naming_code_is_refused_before_importing_it(code_config, capsys):
    url, endpoint, marker, module, _ = code_config
    with pytest.raises(ConfigError) as err:
        load_config(url, [f"storage.endpoint={endpoint}"])
    msg = str(err.value)
    assert "models[1].source" in msg and "--allow-remote-code" in msg and url in msg
    # the CLI says the same as a config error (exit 2)
    assert main(["run", url, f"storage.endpoint={endpoint}"]) == 2
    assert "models[1].source" in capsys.readouterr().err
    assert not marker.exists() and module not in sys.modules


def test_the_opt_in_and_a_local_config_load_the_code(code_config):
    url, endpoint, marker, module, local = code_config
    assert build_parser().parse_args(["run", url, "--allow-remote-code"]).allow_remote_code
    assert build_parser().parse_args(["sanity", url, "--allow-remote-code"]).allow_remote_code
    cfg = load_config(url, [f"storage.endpoint={endpoint}"], allow_remote_code=True)
    assert cfg.models[1].source == f"{module}:make" and marker.read_text() == "ran"
    marker.unlink()
    sys.modules.pop(module, None)
    load_config(str(local))  # a local file is the user's own: trusted as before (README)
    assert marker.exists()


def test_a_local_override_of_the_source_is_not_remote_code(code_config):
    url, endpoint, marker, _, _ = code_config
    cfg = load_config(url, [f"storage.endpoint={endpoint}", "models.1.source=torchvision:resnet18"])
    assert cfg.models[1].source == "torchvision:resnet18" and not marker.exists()
