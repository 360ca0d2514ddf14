"""The config: every problem at once, a line each; the schema's defaults; a my.yaml merged over it."""

import copy

import pytest
import yaml
from snakemake.utils import validate

from turbowan.settings import ConfigError, check_config, load_configfile, merge_config

from .conftest import REPO

SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"
DEFAULT = REPO / "config" / "config.yaml"
BASE = yaml.safe_load(DEFAULT.read_text())


def problems(config) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check_config(config, SCHEMA)
    message = str(caught.value)
    assert message.startswith(f"config: {len(caught.value.problems)} problem(s)")
    assert "sheet" not in message.splitlines()[0] and "$schema" not in message and "properties" not in message
    assert message.splitlines()[1:] == [f"  - {p}" for p in caught.value.problems]  # a line each
    return caught.value.problems


def test_every_problem_at_once_a_line_each():
    config = {**BASE, "boundry": 0.9, "wave_row": 4, "device": "tpu",
              "defaults": {**BASE["defaults"], "num_steps": 5, "num_frames": 48, "width": 64, "num_stepz": 2},
              "video": {"fps": 0}}
    assert problems(config) == [
        "boundry: unknown key (did you mean 'defaults.boundary'?)",
        "wave_row: unknown key (did you mean 'wave_rows'?)",
        "defaults.num_stepz: unknown key (did you mean 'num_steps'?)",
        "defaults.num_steps: 5 is greater than the maximum of 4",
        "device: 'tpu' does not match '^(auto|cpu|cuda(:[0-9]+)?)$'",
        "video.fps: 0 is less than the minimum of 1",
        "defaults.num_frames: 48 is not 4k+1 (e.g. 81, 49, 17)",
        "defaults.width and defaults.height must be given together (or both null)",
    ]


@pytest.mark.parametrize("change, expected", [
    ({"activation_slices": "lots"}, "activation_slices: 'lots' is not 'auto' or an integer >= 1"),
    ({"compile": "yes"}, "compile: 'yes' is not 'auto' or true or false"),
    ({"download": {"high": {"repo": "a/b", "file": "x.pth", "folder": "y"}}},
     "download.high: give exactly one of 'file', 'folder'"),
    ({"download": {"hihg": {"repo": "a/b", "file": "x.pth"}}}, "download.hihg: unknown key (did you mean 'high'?)"),
    ({"models": {k: v for k, v in BASE["models"].items() if k != "vae"}}, "models: 'vae' is a required property"),
    ({"zzz": 1}, "zzz: unknown key (config/config.yaml describes every key)"),
    ({"video": {"fpz": 16}}, "video.fpz: unknown key (did you mean 'fps'?)"),
    ({"video": {"zzz": 16}}, "video.zzz: unknown key (known here: fps, quality)"),
    ({"defaults": "none"}, "defaults: 'none' is not of type 'object'"),
])
def test_one_problem_one_short_line(change, expected):
    assert problems({**BASE, **change}) == [expected]


def test_a_config_that_is_not_a_mapping():
    for config in (None, ["sheet"]):
        with pytest.raises(ConfigError, match="not keys with values"):
            check_config(config, SCHEMA)


@pytest.mark.parametrize("config", [
    {"sheet": "s.csv", "results": "out", "models": BASE["models"], "defaults": {}},
    {**BASE, "video": {"fps": 24}, "gallery": {}, "download": {"vae": {"repo": "a/b", "file": "v.pth"}}},
    {key: value for key, value in BASE.items() if key not in ("worker", "device", "prepared_models")},
])
def test_the_schema_defaults_are_filled_in_as_snakemake_validate_fills_them(config):
    ours, theirs = copy.deepcopy(config), copy.deepcopy(config)
    assert check_config(ours, SCHEMA) is None
    validate(theirs, str(SCHEMA), set_default=True)
    assert ours == theirs
    if "video" in config and config["video"] == {"fps": 24}:
        assert ours["video"] == {"fps": 24, "quality": 8}
    if config["defaults"] == {}:
        assert ours["defaults"] == BASE["defaults"] and ours["worker"] is True and ours["video"] == BASE["video"]


def test_a_config_with_problems_is_left_as_it_was():
    config = {"sheet": "s.csv", "results": "out", "models": BASE["models"], "defaults": {"num_steps": 9}}
    before = copy.deepcopy(config)
    problems(config)
    assert config == before


def test_merge_config_as_snakemake_merges_a_configfile(tmp_path):
    user = {"sheet": "my.csv", "results": "out", "defaults": {"seed": 7, "width": 64, "height": 64},
            "video": {"quality": 10}, "download": {"vae": {"repo": "a/b", "file": "v.pth"}}, "gallery": None}
    before = copy.deepcopy(user)
    merged = merge_config(user, DEFAULT)
    assert user == before and yaml.safe_load(DEFAULT.read_text()) == BASE  # neither changed
    assert merged["sheet"] == "my.csv" and merged["models"] == BASE["models"] and merged["wave_rows"] == BASE["wave_rows"]
    assert merged["defaults"] == {**BASE["defaults"], "seed": 7, "width": 64, "height": 64}
    assert merged["video"] == {**BASE["video"], "quality": 10}
    assert merged["download"] == user["download"] and merged["gallery"] is None  # a non-dict value replaces
    merged["models"]["high"] = "elsewhere"
    assert merge_config({}, DEFAULT) == BASE  # no shared dicts

    from snakemake.utils import update_config

    theirs = copy.deepcopy(BASE)
    update_config(theirs, copy.deepcopy(user))
    assert merge_config(user, DEFAULT) == theirs
    minimal = merge_config({"sheet": "my.csv", "results": "out"}, DEFAULT)
    check_config(minimal, SCHEMA)  # a my.yaml with only these is a whole config


def test_load_configfile(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("")
    assert load_configfile(path) == {}
    path.write_text("sheet: a.csv\nresults: [out\n")
    with pytest.raises(ConfigError, match=r"my.yaml: not valid YAML \(line 3, column 1\)"):
        load_configfile(path)
    path.write_text("- sheet\n")
    with pytest.raises(ConfigError, match="holds a list, not keys with values"):
        load_configfile(path)
    with pytest.raises(ConfigError, match="the config file does not exist"):
        load_configfile(tmp_path / "none.yaml")
