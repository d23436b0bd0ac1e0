"""The README stays true: its config files load, its reference tables name every config key,
output column, method and metric the code has, and the Python snippets under "Reading results"
run against the output of a real (small) run."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import jpeg_bytes, small_config, write_shard
from salmap.pipeline import config as config_module
from salmap.pipeline.config import load_config
from salmap.pipeline.schema import output_schema

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
TOP_LEVEL = ("run", "ray", "input", "storage", "models", "methods", "targets", "metrics",
             "pseudo_labels", "resources")
SECTIONS = {
    "run": config_module.RunSection, "ray": config_module.RaySection,
    "input": config_module.InputSection, "storage": config_module.StorageSection,
    "pseudo_labels": config_module.PseudoLabelsSection,
    "resources": config_module.ResourcesSection,
}
LISTS = {"models": config_module.ModelSection, "methods": config_module.MethodSection}
# what the README's snippets name, and what the test run substitutes for them
README_RUN = 'RUN = "runs/demo"'
README_UNIT = 'UNIT = "efficientnet_lite0__gradcam"'


def _section(title: str) -> str:
    """The README text from the '## <title>' heading to the next '## ' heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_readme_starts_with_the_two_commands():
    lines = README.splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")


@pytest.mark.parametrize("name", ["configs/example.yaml", "configs/demo.yaml"])
def test_config_files_load(name):
    cfg = load_config(str(REPO / name))
    assert cfg.models and cfg.methods and cfg.input.shards


def test_example_config_uses_every_key():
    raw = yaml.safe_load((REPO / "configs" / "example.yaml").read_text())
    assert tuple(raw) == TOP_LEVEL
    assert [f.name for f in dataclasses.fields(config_module.SalmapConfig)] == list(TOP_LEVEL)
    for section, cls in SECTIONS.items():
        assert list(raw[section]) == _fields(cls), section
    for section, cls in LISTS.items():
        assert set(raw[section][0]) == set(_fields(cls)), section


def test_example_config_states_the_defaults():
    """Section keys in example.yaml carry the code's defaults, except the ones it says it sets."""
    raw = yaml.safe_load((REPO / "configs" / "example.yaml").read_text())
    changed = {("input", "shards")}
    for section, cls in SECTIONS.items():
        default = dataclasses.asdict(cls())
        for key, value in raw[section].items():
            if (section, key) not in changed:
                assert value == default[key], f"{section}.{key}: {value!r} vs default {default[key]!r}"


def test_reference_tables_name_everything_the_code_has():
    ref = _section("Configuration reference")
    for section, cls in SECTIONS.items():
        for key in _fields(cls):
            assert f"`{section}.{key}`" in ref, f"{section}.{key} missing from the config reference"
    for section, cls in LISTS.items():
        part = ref[ref.index(f"### `{section}`"):]
        for key in _fields(cls):
            assert f"| `{key}` |" in part, f"{section}[].{key} missing from the config reference"
    columns = _section("Output")
    for field in output_schema(2, 2, curves=True):
        assert f"`{field.name}`" in columns, f"column {field.name} missing from the output schema"
    from salmap.workers.methods import REGISTRY

    methods = _section("Methods")
    for name in REGISTRY:
        assert f"| `{name}` |" in methods, f"method {name} missing from the methods table"
    from salmap.workers.metrics import METRICS

    metrics = _section("Metrics")
    for name, spec in METRICS.items():
        assert f"| `{name}` |" in metrics, f"metric {name} missing from the metrics table"
        for key in spec.defaults:
            assert f"`{key}" in metrics, f"parameter {key} of {name} missing from the metrics table"


def _snippets(section: str = "Reading results") -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(section), flags=re.S)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, ray_cluster):
    """One real run: 3 photos-sized random JPEGs and one corrupt image, the tiny CNN at 64 px,
    gradient + gradcam, a few cheap metrics."""
    from salmap.pipeline.run import EXIT_OK, run_job

    root = tmp_path_factory.mktemp("readme")
    samples = [{"__key__": f"img{i}", "jpg": jpeg_bytes(i), "cls": str(i).encode(),
                "json": json.dumps({"boxes": [[4, 4, 30, 30]], "labels": [i]}).encode()}
               for i in range(3)]
    samples.append({"__key__": "broken", "jpg": b"not a jpeg", "cls": b"1"})
    (root / "shards").mkdir()
    write_shard(root / "shards" / "readme-000000.tar", samples)
    job = root / "job.yaml"
    job.write_text(small_config(
        [str(root / "shards" / "readme-000000.tar")], str(root / "runs"), run_id="readme",
        metrics=["gini", "pseudo_box", {"deletion_auc": {"steps": 4}}, "insertion_auc"]))
    # one sample of four is an error row on purpose: above run.max_error_rate's default
    result = run_job(load_config(str(job), [f"ray.address={ray_cluster}", "run.max_error_rate=1"]),
                     out=lambda *a: None)
    assert result.exit_code == EXIT_OK
    return root / "runs" / "readme"


@pytest.mark.slow
def test_reading_results_snippets_run(small_run, capsys):
    """pandas, polars and DuckDB on the run's own data/ folder, and salmap's reader."""
    blocks = _snippets()
    assert len(blocks) == 4, "expected the pandas, polars, DuckDB and salmap snippets"
    checked = set()
    for i, code in enumerate(blocks):
        assert README_RUN in code, f"snippet {i} does not set {README_RUN}"
        code = code.replace(README_RUN, f"RUN = {str(small_run)!r}")
        code = code.replace(README_UNIT, 'UNIT = "tiny__gradcam"')
        code = code.replace("/data/efficientnet_lite0/gradcam", "/data/tiny/gradcam")
        ns: dict = {"__name__": f"readme_snippet_{i}"}
        exec(compile(code, f"README.md (Reading results, snippet {i})", "exec"), ns)
        out = capsys.readouterr().out
        assert out.strip(), f"snippet {i} printed nothing"
        if "stack" in ns:  # gradcam on the tiny CNN at 64 px: a 2x2 grid; 4 samples, 1 broken
            assert ns["stack"].shape == (4, 2, 2)
            assert [m is None for m in ns["df"]["saliency"]] == list(ns["df"]["status"] != "ok")
            assert all(m.shape == (2, 2) for m in ns["df"]["saliency"] if m is not None)
            assert ns["full"].shape == (40, 48)  # the original image size (conftest jpeg_bytes)
            checked.add("salmap")
        elif "summary" in ns:  # polars
            assert sorted(ns["summary"]["rows"].to_list()) == [3, 3]
            checked.add("polars")
        elif "unit" in ns:  # pandas: one unit with its maps, then 4 samples x 2 units
            assert len(ns["unit"]) == 4 and "saliency" in ns["unit"]
            df = ns["df"]
            assert len(df) == 8 and (df.status == "error").sum() == 2
            assert "broken" in out and "img0.jpg" in out
            checked.add("pandas")
        elif "duckdb" in ns:
            assert "tiny" in out and "gradcam" in out and "gradient" in out
            checked.add("duckdb")
    assert checked == {"salmap", "polars", "pandas", "duckdb"}


def test_python_api_snippet_runs(capsys):
    """The in-memory part of the Python API section (no Ray): Lite0, Grad-CAM, two photos."""
    code = _snippets("Python API")[0]
    ns: dict = {"__name__": "readme_api"}
    exec(compile(code, "README.md (Python API)", "exec"), ns)
    assert len(ns["out"]) == 4 and list(ns["out"]["label"]) == [0, 1, 2, 3]  # the loader's
    assert "(7, 7)" in capsys.readouterr().out
    cat, espresso = ns["rows"]["target"]  # the pretrained model sees them
    assert 281 <= cat <= 285 and espresso == 967


def test_the_readme_says_pandas_gives_saliency_as_flat_arrays(tmp_path):
    """What the note says is what pandas does with the map column."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([output_schema(3, 5).field("saliency")])
    values = np.arange(15, dtype=np.float16)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(values), 15)
    pq.write_table(pa.table([pa.ExtensionArray.from_storage(schema.field(0).type, storage)],
                            schema=schema), tmp_path / "p.parquet")
    cell = pd.read_parquet(tmp_path / "p.parquet").saliency.iloc[0]
    assert cell.shape == (15,) and cell.dtype == np.float16
    h, w = pq.read_schema(tmp_path / "p.parquet").field("saliency").type.shape
    assert np.array_equal(cell.reshape(h, w), values.reshape(3, 5))
    note = " ".join(_section("Reading results").split())
    assert "In pandas each `saliency` value is a flat array of h·w numbers" in note
    assert '`pyarrow.parquet.read_schema(file).field("saliency").type.shape`' in note
