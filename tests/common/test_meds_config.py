"""The ``kind: meds`` site file: defaults, relative paths, and an error naming file, key and value
for every bad input."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from fedmeta.common.data.meds.config import (
    Aggregations,
    load_meds_site_config,
    parse_meds_site,
    window_us,
)
from fedmeta.common.errors import ConfigError

BASE = {"kind": "meds", "path": "meds", "labels": {"mortality": "labels/m.parquet", "aki": "a.pq"}}


def test_defaults_and_paths_relative_to_the_yaml_folder(tmp_path: Path) -> None:
    src = tmp_path / "hospital-07" / "site.yaml"
    cfg = parse_meds_site(BASE, source=src)
    assert cfg.name == "hospital-07"
    assert cfg.path == src.parent / "meds"
    assert cfg.labels == {"mortality": src.parent / "labels/m.parquet", "aki": src.parent / "a.pq"}
    assert cfg.outcomes == ("mortality", "aki")  # the file's order
    assert cfg.windows == ("24h", "all")
    assert cfg.aggregations == Aggregations(
        numeric=("last", "mean", "min", "max", "count"), other=("present", "count")
    )
    assert cfg.min_subjects == 20 and cfg.test_fraction is None and cfg.seed is None
    assert cfg.source == src


def test_every_key_set_and_absolute_paths_kept(tmp_path: Path) -> None:
    data = {
        **BASE,
        "name": "h1",
        "path": str(tmp_path / "abs"),
        "windows": ["30min", "7d", "all"],
        "aggregations": {"numeric": ["first", "max"], "other": ["count"]},
        "min_subjects": 5,
        "test_fraction": 0.25,
        "seed": 3,
    }
    cfg = parse_meds_site(data, source=tmp_path / "site.yaml")
    assert cfg.path == tmp_path / "abs"
    assert cfg.windows == ("30min", "7d", "all")
    assert cfg.aggregations.numeric == ("first", "max") and cfg.aggregations.other == ("count",)
    assert (cfg.name, cfg.min_subjects, cfg.test_fraction, cfg.seed) == ("h1", 5, 0.25, 3)


def test_frozen(tmp_path: Path) -> None:
    cfg = parse_meds_site(BASE, source=tmp_path / "site.yaml")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.min_subjects = 3  # type: ignore[misc]


def test_window_lengths_in_microseconds() -> None:
    assert window_us("24h") == 24 * 3600 * 10**6
    assert window_us("30min") == 30 * 60 * 10**6
    assert window_us("7d") == 7 * 86400 * 10**6
    assert window_us("2w") == 14 * 86400 * 10**6
    assert window_us("all") is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "ehr"}, r"site\.yaml: kind = 'ehr': expected 'meds'"),
        ({"colour": "red"}, r"site\.yaml: unknown key 'colour' for kind meds; allowed: kind, name"),
        ({"source": "x"}, r"unknown key 'source'"),
        ({"windows": ["24x"]}, r"site\.yaml: windows = \['24x'\]: '24x': a window is 'all' or"),
        ({"windows": ["1d", "24h"]}, r"windows = \['1d', '24h'\]: windows repeat"),
        ({"windows": []}, r"windows = \[\]: expected a non-empty list"),
        ({"windows": ["0h"]}, r"'0h': a window is 'all'"),
        ({"aggregations": {"numeric": ["median"]}},
         r"aggregations\.numeric = \['median'\]: 'median' is not one of \['count', 'present'"),
        ({"aggregations": {"other": ["mean"]}}, r"aggregations\.other = \['mean'\]: 'mean' is not one of"),
        ({"aggregations": {"numeric": ["max", "max"]}}, r"aggregations repeat"),
        ({"aggregations": {"text": ["count"]}}, r"aggregations\.text: unknown key; allowed: numeric, other"),
        ({"min_subjects": 0}, r"min_subjects = 0: Input should be greater than or equal to 1"),
        ({"min_subjects": "20"}, r"min_subjects = '20': Input should be a valid integer"),
        ({"test_fraction": 1.5}, r"test_fraction = 1\.5: Input should be less than 1"),
        ({"seed": -1}, r"seed = -1: Input should be greater than or equal to 0"),
        ({"labels": {}}, r"labels = \{\}: expected a mapping of outcome name -> label Parquet file"),
        ({"labels": ["a.parquet"]}, r"labels = \['a\.parquet'\]: expected a mapping"),
        ({"labels": {"m": 3}}, r"outcome 'm': 3 is not a file path"),
        ({"path": None}, r"path = None: Input is not a valid path"),
        ({"name": "a/b"}, r"name = 'a/b': a site name is non-empty and has no '/'"),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_meds_site({**BASE, **change}, source=tmp_path / "site.yaml")


def test_missing_required_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"site\.yaml: key 'labels' is required"):
        parse_meds_site({"kind": "meds", "path": "x"}, source=tmp_path / "site.yaml")
    with pytest.raises(ConfigError, match=r"a site file is a mapping of keys, got list"):
        parse_meds_site([1], source=tmp_path / "site.yaml")  # type: ignore[arg-type]


def test_load_from_a_folder_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(BASE))
    assert load_meds_site_config(tmp_path).path == tmp_path / "meds"
    with pytest.raises(ConfigError, match="site file not found"):
        load_meds_site_config(tmp_path / "nope")
