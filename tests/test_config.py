"""Typed config: YAML recipes, --set overrides, unknown keys fail with the valid ones listed."""

import pytest

from draftsmith.config import StrictConfig, apply_overrides, build_config, load_config
from draftsmith.utils.io import InputError


class Optim(StrictConfig):
    lr: float = 1e-3
    betas: list[float] = [0.9, 0.95]


class Run(StrictConfig):
    name: str = "run"
    steps: int = 10
    optim: Optim = Optim()


def test_yaml_and_overrides_are_typed(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: a\noptim:\n  lr: 0.01\n")
    cfg = load_config(Run, f, ["steps=20", "optim.betas=[0.8, 0.9]", "optim.lr=3e-4"])
    assert cfg.name == "a" and cfg.steps == 20 and cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.8, 0.9]


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(InputError, match=r"unknown key 'optim.lrr'; valid keys here: betas, lr"):
        apply_overrides(Run, {}, ["optim.lrr=1"])
    f = tmp_path / "r.yaml"
    f.write_text("stepz: 3\n")
    with pytest.raises(InputError, match=r"r.yaml: unknown key 'stepz'; valid keys here: name, optim, steps"):
        load_config(Run, f)


def test_bad_values_and_bad_yaml_name_the_source(tmp_path):
    with pytest.raises(InputError, match="steps"):
        build_config(Run, {"steps": "many"})
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1,\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_config(Run, f)
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        apply_overrides(Run, {}, ["steps"])
