"""The ehr / images / synth-ehr / synth-images data sources of the registry."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedmeta.common.config import DataConfig
from fedmeta.common.data.images import load_novel_site
from fedmeta.common.data.registry import data_spec, load_site
from fedmeta.common.data.synth_ehr import OUTCOMES, write_synth_ehr
from fedmeta.common.data.synth_images import CLASSES, write_synth_images
from fedmeta.common.errors import ConfigError


@pytest.fixture(scope="module")
def ehr_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ehr")
    write_synth_ehr(out, sites=3, seed=2, mean_stays=150)
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_synth_images(out, sites=2, seed=2, train_per_class=8, val_per_class=0, test_per_class=3)
    return out


def test_ehr_source(ehr_dir) -> None:
    cfg = DataConfig(source="ehr", path=str(ehr_dir), test_fraction=0.25, split_seed=4)
    spec = data_spec(cfg)
    assert spec.kind == "tabular" and spec.input_shape == (42,) and spec.n_classes == 2
    assert spec.sites == ("hospital-01", "hospital-02", "hospital-03")
    assert spec.outcomes == OUTCOMES
    site = load_site(cfg, "hospital-02")
    n = len((ehr_dir / "hospital-02" / "stays.csv").read_text().splitlines()) - 1
    assert site.n_train + site.n_test == n
    assert site.n_test == pytest.approx(0.25 * n, abs=2)


def test_ehr_source_rejects_disagreeing_sites(ehr_dir, tmp_path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "ehr",
                "path": "x.csv",
                "schema": str(ehr_dir / "schema.yaml"),
                "outcomes": ["mortality"],
            }
        )
    )
    (tmp_path / "b" / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "ehr",
                "path": "x.csv",
                "schema": str(ehr_dir / "schema.yaml"),
                "outcomes": ["aki"],
            }
        )
    )
    with pytest.raises(ConfigError, match=r"b/site\.yaml: outcomes = \['aki'\] differ"):
        data_spec(DataConfig(source="ehr", path=str(tmp_path)))
    (tmp_path / "b" / "site.yaml").write_text(yaml.safe_dump({"kind": "images", "path": "x.npz"}))
    with pytest.raises(ConfigError, match=r"kind = 'images', but data.source 'ehr'"):
        data_spec(DataConfig(source="ehr", path=str(tmp_path)))


def test_ehr_source_needs_a_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.path is empty"):
        data_spec(DataConfig(source="ehr"))
    with pytest.raises(ConfigError, match=r"no <site>/site\.yaml found"):
        data_spec(DataConfig(source="ehr", path=str(tmp_path)))


def test_images_source_with_novel_classes(image_dir) -> None:
    cfg = DataConfig(source="images", path=str(image_dir), novel_classes=5, split_seed=0)
    spec = data_spec(cfg)
    assert spec.kind == "images" and spec.input_shape == (1, 28, 28)
    assert spec.n_classes == len(CLASSES) - 5 and spec.sites == ("site-01", "site-02")
    base = load_site(cfg, "site-01")
    novel = load_novel_site(cfg, "site-01")
    assert set(base.classes).isdisjoint(novel.classes)
    assert len(novel.classes) == 5 and novel.name == "site-01/novel"
    assert base.n_train == 8 * 7 and novel.n_test == 3 * 5
    assert np.bincount(novel.y_train).tolist() == [8] * 5
    all_classes = load_site(DataConfig(source="images", path=str(image_dir)), "site-02")
    assert all_classes.classes == CLASSES


def test_synth_sources_generate_once_into_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    cfg = DataConfig(source="synth-ehr", synth_sites=2, synth_seed=3)
    spec = data_spec(cfg)
    assert spec.sites == ("hospital-01", "hospital-02")
    record = tmp_path / "synth-ehr-v1-2sites-seed3" / "generator.json"
    stamp = record.stat().st_mtime_ns
    assert load_site(cfg, "hospital-02").n_features == 42
    assert record.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [p.name for p in tmp_path.iterdir()] == ["synth-ehr-v1-2sites-seed3"]  # no temp left
    img = DataConfig(source="synth-images", synth_sites=1, synth_seed=0)
    assert data_spec(img).input_shape == (1, 28, 28)


def test_shipped_configs(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from fedmeta.common.config import load_config

    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    root = Path(__file__).resolve().parents[2] / "configs"
    ehr = load_config(root / "ehr-synth.yaml")
    spec = data_spec(ehr.data)
    assert len(spec.sites) == 20 and len(spec.outcomes) == 4
    imaging = load_config(root / "imaging-synth.yaml")
    assert imaging.data.synth_sites == 10 and imaging.data.novel_classes == 5
    assert len(CLASSES) - imaging.data.novel_classes >= imaging.tasks.ways


def test_synth_folder_made_with_other_settings_is_refused(tmp_path) -> None:
    write_synth_ehr(tmp_path, sites=1, seed=0, mean_stays=60)
    with pytest.raises(ConfigError, match=r"holds data generated with \{'n_sites': 1\}"):
        data_spec(DataConfig(source="synth-ehr", path=str(tmp_path), synth_sites=2))
