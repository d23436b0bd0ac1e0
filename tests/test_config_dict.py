"""A config given as a dict (``salmap.run(dict)``) loads as its JSON file would, without a file."""

import json

import yaml
from salmap.pipeline.config import load_config, to_container


def test_a_dict_loads_as_its_json_file(tmp_path):
    with open("configs/demo.yaml") as f:
        config = yaml.safe_load(f)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    overrides = ["run.id=same", "resources.batch_size=3"]
    from_dict = load_config(config, overrides)
    assert to_container(from_dict) == to_container(load_config(str(path), overrides))
    assert from_dict.resources.batch_size == 3
