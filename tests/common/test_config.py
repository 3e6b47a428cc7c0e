"""Experiment config: defaults, overrides, and a clear error for every bad input."""

import json

import pytest

from fedmeta.common.config import ExperimentConfig, config_from_dict, load_config, parse_override
from fedmeta.common.errors import ConfigError


def test_defaults_are_auto_on_fed_heart():
    cfg = load_config()
    assert cfg.algorithm == "auto" and cfg.data.source == "fed-heart"
    assert cfg == ExperimentConfig()


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("rounds: 7\ninner:\n  lr: 0.2\n  steps: 3\nmodel:\n  hidden: [32]\n")
    cfg = load_config(f, ["inner.lr=0.5", "seed=9", "algorithm=reptile"])
    assert (cfg.rounds, cfg.seed, cfg.inner.lr, cfg.inner.steps, cfg.model.hidden) == (7, 9, 0.5, 3, (32,))


def test_override_values_are_typed():
    assert load_config(None, ["inner.lr=1e-3"]).inner.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert parse_override("data.sites=[a, b]") == ("data.sites", ["a", "b"])
    assert parse_override("inner.first_order=true") == ("inner.first_order", True)


def test_round_trip_through_json():
    cfg = load_config(None, ["rounds=3", "data.sites=[Cleveland, Hungary]"])
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=0"], r"<overrides>: rounds = 0: must be >= 1"),
        (["algorithm=sgd"], r"algorithm = 'sgd': expected one of 'auto', 'reptile'"),
        (["inner.lr=fast"], r"inner.lr = 'fast': expected float"),
        (["inner.lr=-1"], r"inner.lr = -1.0: must be > 0"),
        (["inner.step=3"], r"unknown key inner.step; allowed under inner: steps, lr"),
        (["bogus=1"], r"unknown key bogus; allowed under the top level"),
        (["rounds=2.5"], r"rounds = 2.5: expected int"),
        (["inner=3"], r"inner = 3: expected a mapping"),
        (["federation.fraction=1.5"], r"federation.fraction = 1.5: must be in \(0, 1\]"),
        (["compression.method=zip"], r"compression.method = 'zip': expected one of"),
        (["engine.device=tpu"], r"engine.device = 'tpu'"),
        (["rounds"], r"expected KEY=VALUE"),
        (["data.sites=[A]", "data.holdout=[A]"], r"also in data.sites"),
    ],
)
def test_bad_values_name_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_config(notmap)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("outer:\n  lr: 1\n  nesterov: true\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown key outer\.nesterov"):
        load_config(unknown)


def test_config_is_frozen_and_not_mutated_by_overrides():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.rounds = 3  # type: ignore[misc]
    load_config(None, ["rounds=3"])
    assert load_config().rounds == cfg.rounds
