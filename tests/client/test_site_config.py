"""Site YAML validation and the site-side loading and summary used by ``fedmeta data check``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmeta.common.config import DataConfig, TaskConfig
from fedmeta.common.data.schema import Feature, Schema, save_schema
from fedmeta.common.errors import ConfigError, DataError
from fedmeta.sitecore.data import (
    EhrSiteConfig,
    ImageSiteConfig,
    check_site,
    load_local_site,
    load_site_config,
)

EHR = {"kind": "ehr", "path": "stays.csv", "schema": "../schema.yaml", "outcomes": ["death"]}


def _site(tmp_path: Path, data: dict, folder: str = "h1") -> Path:
    d = tmp_path / folder
    d.mkdir(exist_ok=True)
    (d / "site.yaml").write_text(yaml.safe_dump(data))
    return d / "site.yaml"


def _cohort(tmp_path: Path, n: int = 20, events: int = 5) -> Path:
    save_schema(
        Schema((Feature("age", "numeric"), Feature("sex", "categorical", ("F", "M")))),
        tmp_path / "schema.yaml",
    )
    (tmp_path / "h1").mkdir(exist_ok=True)
    age = np.arange(n, dtype=float).astype(object)
    age[:4] = None  # 4 of n missing
    pd.DataFrame(
        {"age": age, "sex": ["F", "M"] * (n // 2), "death": [1] * events + [0] * (n - events)}
    ).to_csv(tmp_path / "h1" / "stays.csv", index=False)
    return _site(tmp_path, {**EHR, "unit_column": "sex"})


def test_ehr_config_paths_resolved_and_defaults(tmp_path) -> None:
    path = _site(tmp_path, EHR)
    config = load_site_config(path)
    assert isinstance(config, EhrSiteConfig)
    assert config.name == "h1"  # the folder's name
    assert config.path == tmp_path / "h1" / "stays.csv"
    assert config.schema == tmp_path / "h1" / ".." / "schema.yaml"
    assert config.test_fraction is None and config.seed is None and config.missing_indicators
    assert load_site_config(tmp_path / "h1") == config  # a folder means folder/site.yaml


def test_image_config(tmp_path) -> None:
    path = _site(
        tmp_path,
        {
            "kind": "images",
            "name": "scan-a",
            "path": "/data/x.npz",
            "classes": ["a", "b"],
            "image_size": [28, 30],
            "seed": 3,
        },
    )
    config = load_site_config(path)
    assert isinstance(config, ImageSiteConfig)
    assert (config.name, config.path, config.classes) == ("scan-a", Path("/data/x.npz"), ("a", "b"))
    assert config.image_size == (28, 30) and config.seed == 3 and not config.is_folder


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**EHR, "outcome": ["x"]}, r"unknown key 'outcome' for kind ehr; allowed: kind, name"),
        ({**EHR, "classes": ["x"]}, r"unknown key 'classes' for kind ehr"),
        ({**EHR, "kind": "table"}, r"kind = 'table': expected 'ehr'"),
        ({k: v for k, v in EHR.items() if k != "outcomes"}, r"key 'outcomes' is required"),
        ({k: v for k, v in EHR.items() if k != "schema"}, r"key 'schema' is required"),
        ({**EHR, "outcomes": []}, r"outcomes = \[\]: expected a non-empty list"),
        ({**EHR, "outcomes": ["a", "a"]}, r"outcomes = \['a', 'a'\]: names repeat"),
        ({**EHR, "test_fraction": 1.5}, r"test_fraction = 1\.5: expected a number in \(0, 1\)"),
        ({**EHR, "seed": -1}, r"seed = -1: expected an integer >= 0"),
        ({**EHR, "seed": "x"}, r"seed = 'x'"),
        (
            {**EHR, "missing_indicators": "yes"},
            r"missing_indicators = 'yes': expected true or false",
        ),
        ({**EHR, "unit_column": "death"}, r"unit_column = 'death': is also an outcome"),
        ({**EHR, "name": "a/b"}, r"name = 'a/b': a site name must not contain"),
        ({**EHR, "path": ""}, r"path = '': expected a non-empty string"),
        ({"kind": "images", "path": "x.npz", "image_size": [28]}, r"image_size = \[28\]: expected"),
        (
            {"kind": "images", "path": "x.npz", "unit_column": "u"},
            r"unknown key 'unit_column' for kind images",
        ),
    ],
)
def test_bad_site_files_name_file_key_and_value(tmp_path, data: dict, message: str) -> None:
    path = _site(tmp_path, data)
    with pytest.raises(ConfigError, match=r"h1/site\.yaml: .*" + message):
        load_site_config(path)


def test_site_file_not_found_or_not_a_mapping(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: site file not found"):
        load_site_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_site_config(tmp_path / "list.yaml")


def test_check_site_summary_by_hand(tmp_path) -> None:
    path = _cohort(tmp_path)
    s = check_site(
        path, data=DataConfig(test_fraction=0.2, split_seed=0), tasks=TaskConfig(support=5, query=5)
    )
    # 20 rows; death: 5 events -> 1 test, 15 non-events -> 3 test
    assert (s.n_rows, s.n_train, s.n_test) == (20, 16, 4)
    assert s.prevalence == {"death": 0.25} and s.labelled == {"death": 20}
    assert s.missing == {"age": 0.2, "sex": 0.0}
    assert s.units == {"F": 10, "M": 10}
    assert s.n_features == 4  # age, sex=F, sex=M, age__missing


def test_local_site_too_few_patients_for_tasks(tmp_path) -> None:
    path = _cohort(tmp_path)
    site = load_local_site(path, data=DataConfig(test_fraction=0.2))
    assert site.n_train == 16
    with pytest.raises(
        DataError,
        match=r"site 'h1', outcome 'death': 16 labelled training "
        r"patients, but a task needs support 10 \+ query 10 = 20",
    ):
        load_local_site(
            path, data=DataConfig(test_fraction=0.2), tasks=TaskConfig(support=10, query=10)
        )


def test_site_file_values_override_experiment_defaults(tmp_path) -> None:
    _cohort(tmp_path)
    path = _site(tmp_path, {**EHR, "test_fraction": 0.5})
    # 0.5 from the site file: 5 events -> floor(2.5 + 0.5) = 3, 15 non-events -> 8 in test
    assert load_local_site(path, data=DataConfig(test_fraction=0.2)).n_test == 11


def test_missing_data_file_named(tmp_path) -> None:
    save_schema(Schema((Feature("age", "numeric"),)), tmp_path / "schema.yaml")
    path = _site(tmp_path, EHR)
    with pytest.raises(DataError, match=r"h1/stays\.csv: data file not found"):
        load_local_site(path)


def test_image_site_summary(tmp_path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    labels = np.repeat(np.arange(3), 4).astype(np.uint8)[:, None]
    np.savez(
        d / "images.npz",
        train_images=np.zeros((12, 6, 6), np.uint8),
        train_labels=labels,
        test_images=np.zeros((3, 6, 6), np.uint8),
        test_labels=labels[::4],
    )
    path = _site(
        tmp_path, {"kind": "images", "path": "images.npz", "classes": ["a", "b", "c"]}, folder="s"
    )
    s = check_site(path, tasks=TaskConfig(ways=3, support=2, query=2))
    assert s.class_counts == {"a": 4, "b": 4, "c": 4} and s.image_shape == (1, 6, 6)
    with pytest.raises(
        DataError, match=r"an episode needs 2 shots \+ 3 queries = 5 training images per class"
    ):
        check_site(path, tasks=TaskConfig(ways=3, support=2, query=3))


def test_each_site_file_loader_names_the_other_file(tmp_path) -> None:
    from fedmeta.deploy.node import load_node_config

    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    node = tmp_path / "node.yaml"
    node.write_text(yaml.safe_dump({"site": "a", "superlink": "h:9092", "root_certificates": "ca.crt",
                                    "auth_private_key": "key"}))
    with pytest.raises(ConfigError, match=r"node\.yaml: this is a site's node file .* not a data description"):
        load_site_config(node)
    data = _site(tmp_path, EHR)
    with pytest.raises(ConfigError, match=r"site\.yaml: this is a site data description \(kind: ehr\), "
                                          r"not a node file"):
        load_node_config(data)
