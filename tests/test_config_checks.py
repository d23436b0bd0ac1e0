"""Config values that cannot run are config errors (exit 2) naming the key, before Ray starts."""

from __future__ import annotations

import re

import pytest
from conftest import small_config
from salmap.pipeline.cli import main
from salmap.pipeline.config import ConfigError, load_config


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(small_config([str(tmp_path / "shard-000000.tar")], str(tmp_path / "out")))
    return str(path)


@pytest.mark.parametrize("override, expected", [
    ("run.lock_lease_s=0", "run.lock_lease_s must be > 0"),
    ("run.lock_lease_s=-5", "run.lock_lease_s must be > 0"),
    ("resources.gpus_per_actor=-1", "resources.gpus_per_actor must be 'auto' or a number >= 0"),
    ("resources.cpus_per_actor=0", "resources.cpus_per_actor must be > 0"),
    ("storage.connect_timeout_s=0", "storage.connect_timeout_s must be > 0"),
    ("storage.request_timeout_s=-1", "storage.request_timeout_s must be > 0"),
    ("storage.retries=0", "storage.retries must be >= 1"),
    ("input.max_member_bytes=0", "input.max_member_bytes must be a whole number of bytes >= 1"),
    ("run.saliency_png=full", "run.saliency_png: 'full' is not one of native, original, none"),
])
def test_values_that_cannot_run(job, override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(job, [override])


def test_good_values_pass(job):
    cfg = load_config(job, ["run.lock_lease_s=0.5", "resources.gpus_per_actor=0.5",
                            "resources.cpus_per_actor=0.25"])
    assert cfg.run.lock_lease_s == 0.5


def test_a_model_factory_is_imported_at_config_time(job, tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torchvision\n\n"
        "def build():\n    return torchvision.models.resnet18(weights=None)\n\n"
        "NOT_CALLABLE = 3\n")
    (pkg / "broken.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_config(job, ["models.0.source=mymodels.nets:build"]).models[0].source
    with pytest.raises(ConfigError, match=r"models\[0\]\.source: module 'mymodels.nets' has no "
                                          r"'biuld' \(did you mean 'build'\?\)"):
        load_config(job, ["models.0.source=mymodels.nets:biuld"])
    with pytest.raises(ConfigError, match="not a callable"):
        load_config(job, ["models.0.source=mymodels.nets:NOT_CALLABLE"])
    with pytest.raises(ConfigError, match="No module named 'a_package_that_is_not_installed'"):
        load_config(job, ["models.0.source=mymodels.broken:build"])
    # from the command line: exit 2, one line naming the key, the module and where it must be
    code = main(["run", job, "models.0.source=mymodelz.nets:build"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "models[0].source: cannot import module 'mymodelz.nets'" in err
    assert "importable on the driver and on every Ray node" in err


def test_methods_take_bare_names_like_metrics(job, tmp_path):
    cfg = load_config(job, ["methods=[gradcam, {name: gradient, batch_size: 4}]"])
    assert [(m.name, m.batch_size) for m in cfg.methods] == [("gradcam", None), ("gradient", 4)]
    assert [m.name for m in load_config(job, ["methods=gradcam"]).methods] == ["gradcam"]
    bare = tmp_path / "bare.yaml"  # in the file too (and so in the Python API's dicts)
    bare.write_text(small_config(["x.tar"], str(tmp_path), methods=["gradcam", "layercam"]))
    assert [m.name for m in load_config(str(bare)).methods] == ["gradcam", "layercam"]
    bare.write_text(small_config(["x.tar"], str(tmp_path), methods="gradcam"))
    assert [m.name for m in load_config(str(bare)).methods] == ["gradcam"]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.name: unknown method 'gradcan' "
                                          r"\(did you mean 'gradcam'\?\)"):
        load_config(job, ["methods=[gradcan]"])


def test_the_png_preview_is_part_of_what_makes_a_units_rows(job):
    """Rows with PNGs at the photo's size (every run made before run.saliency_png) keep their
    unit hash with ``original``; the other previews make other rows, so another hash."""
    from salmap.pipeline.config import unit_hash

    def hash_of(value: str) -> str:
        cfg = load_config(job, [f"run.saliency_png={value}"])
        return unit_hash(cfg, cfg.models[0], cfg.methods[0])

    hashes = {v: hash_of(v) for v in ("native", "original", "none")}
    assert len(set(hashes.values())) == 3
    cfg = load_config(job)
    assert cfg.run.saliency_png == "native" and unit_hash(cfg, cfg.models[0],
                                                          cfg.methods[0]) == hashes["native"]
